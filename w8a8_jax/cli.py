"""The `w8a8-jax` command line (also `python -m w8a8_jax`)."""

import argparse
import re
import sys
import time
from pathlib import Path

from w8a8_jax.scheme import ACTIVATION_NAMES, DEFAULT_BLOCK_SIZE, WEIGHT_NAMES, Fp8Scheme
from w8a8_jax.table import format_table


def _demo(args: argparse.Namespace) -> None:
    from w8a8_jax import demo

    demo.main(seed=args.seed)


def _size(nbytes: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(nbytes) < 1024 or unit == "GiB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024


def _parse_size(text: str) -> int:
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?i?B?)\s*", text, re.IGNORECASE)
    if not match:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 4GiB, 500MB, 1048576)")
    number, unit = float(match.group(1)), match.group(2).upper().rstrip("B").rstrip("I")
    return int(number * {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}[unit])


def _regex(text: str) -> str:
    try:
        re.compile(text)
    except re.error as err:
        raise argparse.ArgumentTypeError(f"not a regular expression: {text!r} ({err})") from None
    return text


def _block_size(text: str | None, weights: str) -> tuple[int, int] | None:
    """`--block-size BN,BK` as `(bn, bk)`: two ints >= 1, only with `--weights block` (default
    128,128 there); None for the other weights."""
    if weights != "block":
        if text is not None:
            raise ValueError(f"--block-size applies only to --weights block, got --weights {weights}")
        return None
    if text is None:
        return DEFAULT_BLOCK_SIZE
    parts = text.replace("x", ",").split(",")
    if len(parts) != 2 or not all(part.strip().isdigit() and int(part) >= 1 for part in parts):
        raise ValueError(f"--block-size must be two ints >= 1 as BN,BK (e.g. 128,128), got {text!r}")
    return int(parts[0]), int(parts[1])


def _weights_description(config) -> str:
    """The checkpoint's weights in words: "block 128x128 weights", "per_channel weights"."""
    if config.is_block:
        return f"block {config.block_size[0]}x{config.block_size[1]} weights"
    return f"{config.weight_granularity} weights"


def _progress(total: int, description: str, disable: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=description, unit="tensor", file=sys.stderr, disable=disable, dynamic_ncols=True)


def _sample_inputs(path: str | None):
    if path is None:
        return None
    from w8a8_jax.checkpoint import SafetensorsCheckpoint

    data = SafetensorsCheckpoint(path)
    return {name: data.tensor(name) for name in data.names}


def _check_not_inside(output: Path, source) -> None:
    """The output directory must be neither the source checkpoint's directory nor hold it."""
    output = output.resolve()
    for file in source.files:
        if output in file.resolve().parents:
            raise ValueError(f"the output {output} holds the input checkpoint; write to another directory")


def _quantize(args: argparse.Namespace) -> None:
    from w8a8_jax import checkpoint

    source = checkpoint.SafetensorsCheckpoint(args.input)
    _check_not_inside(Path(args.output), source)
    if "quantization_config" in source.config:
        raise ValueError(
            f"{args.input} is already quantized ({source.config['quantization_config'].get('quant_method')})"
        )
    patterns = ([] if args.no_default_exclude else [checkpoint.DEFAULT_EXCLUDE]) + [p for p in args.exclude if p]
    exclude = "|".join(f"(?:{pattern})" for pattern in patterns) or None
    layers, skipped = checkpoint.linear_weight_prefixes(source, args.include, exclude)
    if not layers:
        raise ValueError(f"no float 2-D '*.weight' tensor in {args.input} matches --include/--exclude")
    block_size = _block_size(args.block_size, args.weights)
    if block_size is not None and args.activations not in ("dynamic-group", "dynamic-token"):
        raise ValueError(
            f"--weights block quantizes activations per token group: use --activations dynamic-group (or leave the "
            f"default), got --activations {args.activations}"
        )
    scheme = Fp8Scheme.from_names(args.weights, args.activations, block_size=block_size)
    form = args.format
    if form == "auto":
        form = "fp8" if checkpoint.QuantizationConfig.fp8_form_holds(scheme) else "compressed-tensors"
    config = checkpoint.QuantizationConfig(
        scheme=scheme, ignore=checkpoint.ignored_layers(layers, skipped), form=form, targets=tuple(layers)
    )
    calibration = _sample_inputs(args.calibrate)
    if calibration is not None and not config.is_static:
        print("w8a8-jax quantize: note: --calibrate is only used by --activations static", file=sys.stderr)
    extra_files = {}
    if Path(args.input).is_dir():
        skip = {"config.json", "model.safetensors.index.json"}
        extra_files = {
            path.name: path
            for path in sorted(Path(args.input).iterdir())
            if path.is_file()
            and path.suffix != ".safetensors"
            and path.name not in skip
            and not path.name.startswith(".")
        }
    model_config = {**source.config, "quantization_config": config.to_dict()}
    start = time.perf_counter()
    with _progress(len(source.names), "quantize", args.no_progress) as bar:

        def on_tensor(name: str, action: str) -> None:
            bar.set_postfix_str(name if len(name) < 48 else "…" + name[-47:], refresh=False)
            bar.update()

        with checkpoint.CheckpointWriter(
            args.output,
            config=model_config,
            max_shard_bytes=args.max_shard_size,
            extra_files=extra_files,
            overwrite=args.overwrite,
        ) as writer:
            rows = checkpoint.quantize_checkpoint(
                source, writer, config, layers, calibration=calibration, on_tensor=on_tensor
            )
    seconds = time.perf_counter() - start
    _note_ragged_blocks(config, rows)
    header = ("layer", "shape", "dtype", "weight_scale", "input_scale", "bytes")
    table_rows = [
        (
            row["layer"],
            "x".join(map(str, row["shape"])),
            f"{row['dtype']}->F8_E4M3",
            f"{row['scale_min']:.3g}"
            if row["scale_min"] == row["scale_max"]
            else f"{row['scale_min']:.3g}..{row['scale_max']:.3g}",
            "-" if row["input_scale"] is None else f"{row['input_scale']:.3g}",
            f"{_size(row['bytes_in'])} -> {_size(row['bytes_out'])}",
        )
        for row in rows
    ]
    print(format_table(header, table_rows))
    bytes_in, bytes_out = sum(r["bytes_in"] for r in rows), sum(r["bytes_out"] for r in rows)
    total_in = sum(source.nbytes(name) for name in source.names)
    print(
        f"\n{len(rows)} layers quantized ({_weights_description(config)}, {config.activation_scheme} activations, "
        f"'{config.form}' quantization_config), {len(skipped)} left float; linear weights "
        f"{_size(bytes_in)} -> {_size(bytes_out)}, checkpoint {_size(total_in)} -> {_size(writer.total_bytes)}; "
        f"{len(source.names)} tensors in {seconds:.1f} s -> {args.output}"
    )


def _note_ragged_blocks(config, rows) -> None:
    """Says which layers of an fp8-form block checkpoint end inside a block: vLLM and we read them,
    but transformers' dequantizing loader (its CPU path) infers the block from the scale grid and
    cannot."""
    if config.form != "fp8" or not config.is_block:
        return
    bn, bk = config.block_size
    ragged = [row["layer"] for row in rows if row["shape"][0] % bn or row["shape"][1] % bk]
    if ragged:
        print(
            f"w8a8-jax quantize: note: {len(ragged)} layer(s) (e.g. {ragged[0]}) have N or K not a multiple of the "
            f"{bn}x{bk} block; transformers' dequantizing fp8 loader cannot read those (vLLM can)",
            file=sys.stderr,
        )


def _inspect(args: argparse.Namespace) -> None:
    from w8a8_jax import checkpoint

    ckpt = checkpoint.SafetensorsCheckpoint(args.checkpoint)
    total = sum(ckpt.nbytes(name) for name in ckpt.names)
    files = f"{len(ckpt.files)} file{'s' if len(ckpt.files) > 1 else ''}"
    if "quantization_config" not in ckpt.config:
        dtypes: dict[str, int] = {}
        for name in ckpt.names:
            dtypes[ckpt.dtype_name(name)] = dtypes.get(ckpt.dtype_name(name), 0) + 1
        layers, skipped = checkpoint.linear_weight_prefixes(ckpt)
        print(
            f"float checkpoint ({files}): {len(ckpt.names)} tensors, {_size(total)}; dtypes "
            + ", ".join(f"{dtype} x{count}" for dtype, count in sorted(dtypes.items()))
            + f"; {len(layers)} linear weights `quantize` would convert by default, {len(skipped)} it leaves float"
        )
        return
    config = checkpoint.read_quantization_config(ckpt)
    rows, fp8_bytes, bf16_bytes, blocks = [], 0, 0, 0
    with _progress(len(checkpoint.fp8_layer_prefixes(ckpt)), "inspect", args.no_progress) as bar:
        for layer in checkpoint.read_fp8_layers(ckpt, config):
            scale = layer.weight_scale
            rows.append(
                (
                    layer.prefix,
                    "x".join(map(str, layer.weight.shape)),
                    "F8_E4M3",
                    "x".join(map(str, scale.shape)),
                    _scale_statistics(scale, config.is_block),
                    "-" if layer.input_scale is None else f"{float(layer.input_scale[0]):.3g}",
                    "yes" if layer.bias is not None else "no",
                )
            )
            fp8_bytes += layer.weight.nbytes + scale.nbytes + (0 if layer.input_scale is None else 4)
            bf16_bytes += layer.weight.size * 2
            blocks += scale.size if config.is_block else 0
            bar.update()
    scale_header = f"{config.weight_scale_name} (blocks: min/median/max)" if config.is_block else "weight_scale"
    print(format_table(("layer", "shape", "dtype", "scale shape", scale_header, "input_scale", "bias"), rows))
    block_note = f" ({blocks} blocks in all)" if config.is_block else ""
    print(
        f"\n'{config.form}' quantization_config: {_weights_description(config)}{block_note}, {config.activation_scheme} "
        f"activations; {len(rows)} fp8 layers, {len(config.ignore)} left float; {files}, {_size(total)} in all; "
        f"fp8 layers {_size(fp8_bytes)} (bf16 {_size(bf16_bytes)}, {_size(bf16_bytes - fp8_bytes)} saved, "
        f"{bf16_bytes / max(fp8_bytes, 1):.2f}x smaller)"
    )


def _scale_statistics(scale, block: bool) -> str:
    """One layer's weight scales in a few characters: the value, its range and mean, or for block
    scales the number of blocks and their min/median/max."""
    import numpy as np

    if block:
        return f"{scale.size} blocks: {scale.min():.3g}/{float(np.median(scale)):.3g}/{scale.max():.3g}"
    if scale.size == 1:
        return f"{scale.min():.3g}"
    return f"{scale.min():.3g}..{scale.max():.3g} (mean {scale.mean():.3g})"


def _report(args: argparse.Namespace) -> None:
    from w8a8_jax import checkpoint

    float_ckpt = checkpoint.SafetensorsCheckpoint(args.float_checkpoint)
    fp8_ckpt = checkpoint.SafetensorsCheckpoint(args.fp8_checkpoint)
    config = checkpoint.read_quantization_config(fp8_ckpt)
    inputs = _sample_inputs(args.inputs)
    prefixes = checkpoint.fp8_layer_prefixes(fp8_ckpt)
    if not prefixes:
        raise ValueError(f"{args.fp8_checkpoint} holds no fp8 layers to report on")
    with _progress(len(prefixes), "report", args.no_progress) as bar:
        reports = checkpoint.compare_checkpoints(
            float_ckpt, fp8_ckpt, inputs, config=config, on_layer=lambda _: bar.update()
        )
    header = ["layer", "shape", "weight SQNR dB", "max abs err", "max rel err"]
    with_outputs = any(r.output_sqnr_db is not None for r in reports)
    if with_outputs:
        header += ["output SQNR dB", "output max rel err"]
    rows = []
    for r in reports:
        row = [
            r.layer,
            "x".join(map(str, r.shape)),
            f"{r.weight_sqnr_db:.2f}",
            f"{r.weight_max_abs_error:.3g}",
            f"{r.weight_max_rel_error:.3g}",
        ]
        if with_outputs:
            row += (
                ["-", "-"] if r.output_sqnr_db is None else [f"{r.output_sqnr_db:.2f}", f"{r.output_max_rel_error:.3g}"]
            )
        rows.append(tuple(row))
    print(format_table(tuple(header), rows))
    worst = min(reports, key=lambda r: r.weight_sqnr_db)
    summary = f"\n{len(reports)} layers ({_weights_description(config)}, {config.activation_scheme}); lowest weight SQNR {worst.weight_sqnr_db:.2f} dB ({worst.layer})"
    if with_outputs:
        observed = [r for r in reports if r.output_sqnr_db is not None]
        worst_out = min(observed, key=lambda r: r.output_sqnr_db)
        summary += f"; lowest output SQNR {worst_out.output_sqnr_db:.2f} dB ({worst_out.layer}, {len(observed)} layers with inputs)"
    print(summary)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="w8a8-jax", description="FP8 W8A8 linear layers for JAX.")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="run a jitted fp8 Llama MLP block through every path this backend has")
    demo.add_argument("--seed", type=int, default=0, help="seed of the random weights and activations")
    demo.set_defaults(run=_demo)

    quantize = commands.add_parser(
        "quantize",
        help="convert a float safetensors checkpoint to an FP8 checkpoint vLLM loads",
        description="Convert the linear weights of a float (f32/bf16/f16) safetensors checkpoint to FP8 and write "
        "it, with config.json's quantization_config, in the layout vLLM loads. Other tensors are copied unchanged.",
    )
    quantize.add_argument(
        "input", help="float checkpoint: a directory (model.safetensors or an index) or a .safetensors file"
    )
    quantize.add_argument("output", help="directory to write (atomically; must not exist or be empty)")
    quantize.add_argument(
        "--weights",
        choices=WEIGHT_NAMES,
        default="channel",
        help="weight scale granularity: tensor, channel (default) or block (one scale per --block-size block, "
        "DeepSeek-V3's layout)",
    )
    quantize.add_argument(
        "--block-size",
        metavar="BN,BK",
        help="the weight block of --weights block: BN output rows by BK input columns (default 128,128); "
        "activations are quantized per token in groups of BK",
    )
    quantize.add_argument(
        "--activations",
        choices=ACTIVATION_NAMES,
        default="dynamic-token",
        help="static (calibrated input_scale), dynamic (per tensor), dynamic-token (default) or dynamic-group "
        "(per token and group of BK: block weights take only this, and read the default as it)",
    )
    quantize.add_argument(
        "--calibrate",
        metavar="DATA",
        help="safetensors file of sample inputs per layer (tensor name = layer prefix, shape (..., K)); needed by static",
    )
    quantize.add_argument(
        "--include", type=_regex, metavar="REGEX", help="quantize only layers whose prefix matches (re.search)"
    )
    quantize.add_argument(
        "--exclude",
        type=_regex,
        metavar="REGEX",
        action="append",
        default=[],
        help="also leave layers whose prefix matches float (repeatable; embeddings, norms and lm_head always are, "
        "unless --no-default-exclude)",
    )
    quantize.add_argument(
        "--no-default-exclude",
        action="store_true",
        help="drop the default exclusions (embeddings, norms, lm_head): only --exclude patterns stay float",
    )
    quantize.add_argument(
        "--format",
        choices=("compressed-tensors", "fp8", "auto"),
        default="compressed-tensors",
        help="quantization_config form: compressed-tensors (default; vLLM, transformers and llm-compressor read "
        "it), fp8 (vLLM's own form: per-tensor weights, vLLM reads it and transformers misreads it as block fp8; or "
        "block weights stored as DeepSeek-V3 does, weight_scale_inv, which vLLM and transformers read; on CPU "
        "transformers needs N and K multiples of the block), auto "
        "(fp8 where it can express the scheme)",
    )
    quantize.add_argument("--max-shard-size", type=_parse_size, default=4 << 30, metavar="SIZE", help="default 4GiB")
    quantize.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    quantize.add_argument("--no-progress", action="store_true", help="no progress bar")
    quantize.set_defaults(run=_quantize)

    inspect = commands.add_parser("inspect", help="layers, dtypes, shapes, scale statistics and bytes saved")
    inspect.add_argument("checkpoint", help="a checkpoint directory or .safetensors file")
    inspect.add_argument("--no-progress", action="store_true", help="no progress bar")
    inspect.set_defaults(run=_inspect)

    report = commands.add_parser("report", help="per-layer error of an FP8 checkpoint against its float checkpoint")
    report.add_argument("float_checkpoint")
    report.add_argument("fp8_checkpoint")
    report.add_argument(
        "--inputs",
        metavar="DATA",
        help="safetensors file of sample inputs per layer (as --calibrate): adds output error",
    )
    report.add_argument("--no-progress", action="store_true", help="no progress bar")
    report.set_defaults(run=_report)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except (ValueError, TypeError, OSError, NotImplementedError) as err:
        print(f"w8a8-jax {args.command}: error: {err}", file=sys.stderr)
        return 1
    return 0
