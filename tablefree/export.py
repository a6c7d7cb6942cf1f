"""`tablefree export MODEL OUT --format gpt-neox|gguf`: a stock GPT-NeoX checkpoint, or a GGUF file for llama.cpp.

The table-free model's fixed code vectors of all V ids are written into `embed_in.weight` (a
constant that is never trained), so any engine that serves GPT-NeoX (vLLM, SGLang, TGI,
llama.cpp) serves the model without remote code, and its logits equal the table-free model's.
`--format gguf` writes that network and the tokenizer as OUT/model.gguf with a model card (gguf.py).
"""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

from .errors import TableFreeError

EXPORT_FORMATS = ("gpt-neox", "gguf")


def to_gpt_neox(model):
    """The same network as a stock GPTNeoXForCausalLM whose embed_in holds the code table."""
    import torch
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    from .configuration_tablefree import TableFreeConfig

    config = model.config
    if not isinstance(config, TableFreeConfig):
        return model
    # What TableFreeConfig adds to GPT-NeoX's config, plus the bookkeeping that names the table-free classes.
    code_fields = {f.name for f in fields(TableFreeConfig)} - {f.name for f in fields(GPTNeoXConfig)} | {
        "auto_map", "architectures", "model_type", "transformers_version",
    }
    neox_config = GPTNeoXConfig(**{k: v for k, v in config.to_dict().items() if k not in code_fields})
    with torch.device("meta"):
        neox = GPTNeoXForCausalLM(neox_config)
    state = dict(model.state_dict())
    dtype = model.lm_head.weight.dtype
    state["gpt_neox.embed_in.weight"] = model.get_input_embeddings().table(dtype=dtype, device=model.device)
    neox.load_state_dict(state, strict=True, assign=True)
    # Non-persistent rotary buffers are not in the state dict: build them on real memory.
    neox.gpt_neox.rotary_emb = type(neox.gpt_neox.rotary_emb)(config=neox_config).to(model.device)
    return neox.eval()


def export_model(model_path: str, out: str, format: str = "gpt-neox", force: bool = False, outtype: str | None = None) -> Path:
    """Export a saved model to OUT in `format`; returns what was written (the directory, or the GGUF file)."""
    from .files import claim_output_dir, output_lock
    from .hub import MODEL_KIND, load_model, resolve_model_path, save_model

    if format not in EXPORT_FORMATS:
        raise TableFreeError(f"unknown export format {format!r}; choose one of {', '.join(EXPORT_FORMATS)}")
    if format != "gguf" and outtype is not None:
        raise TableFreeError(f"--outtype applies to --format gguf only; --format {format} keeps the model's float32 weights")
    source = resolve_model_path(model_path)
    if format == "gguf":
        return export_gguf(source, Path(out), outtype, force)
    with output_lock(out, inputs=[source]):
        claim_output_dir(out, MODEL_KIND, resumable=False, force=force, inputs=[source])
        model, tokenizer = load_model(source)
        return save_model(to_gpt_neox(model), out, tokenizer)


def export_gguf(source: Path, out: Path, outtype: str | None, force: bool) -> Path:
    """OUT/model.gguf and OUT/README.md (the model card), built beside OUT and moved in (files.staged_directory)."""
    from .files import claim_output_dir, output_lock, staged_directory
    from .gguf import CARD_NAME, GGUF_KIND, GGUF_NAME, OUTTYPES, import_gguf, model_card, write_gguf
    from .hub import load_model

    outtype = outtype or OUTTYPES[0]
    if outtype not in OUTTYPES:
        raise TableFreeError(f"unknown --outtype {outtype!r}; choose one of {', '.join(OUTTYPES)}")
    if out.suffix == ".gguf":
        raise TableFreeError(f"OUT is a directory that receives {GGUF_NAME} and its model card {CARD_NAME}; "
                             f"give a directory name instead of {out}")
    import_gguf()  # a missing package is said before the model loads
    with output_lock(out, inputs=[source]):
        claim_output_dir(out, GGUF_KIND, resumable=False, force=force, inputs=[source], writes=[GGUF_NAME, CARD_NAME])
        model, tokenizer = load_model(source)
        if tokenizer is None:
            raise TableFreeError(f"{source} has no tokenizer; the GGUF file carries one for llama.cpp to tokenise with")
        name = out.resolve().name
        with staged_directory(out, GGUF_KIND) as stage:
            write_gguf(to_gpt_neox(model), tokenizer, stage.path / GGUF_NAME, outtype, name)
            (stage.path / CARD_NAME).write_text(model_card(name, outtype))
    return out / GGUF_NAME


def add_cli(subparsers) -> None:
    export = subparsers.add_parser("export")
    export.add_argument("model", help="model directory or cached hub id")
    export.add_argument("out", help="output directory (new or empty; see --force); gguf writes OUT/model.gguf and OUT/README.md")
    export.add_argument("--format", default="gpt-neox", help=f"one of: {', '.join(EXPORT_FORMATS)}")
    export.add_argument("--outtype", default=None,
                        help="gguf weight type: f32 (default), f16, bf16 or q8_0 (norms and biases stay f32)")
    export.add_argument("--force", action="store_true",
                        help="write into a non-empty OUT; files tablefree did not write are never removed or overwritten")
    export.set_defaults(run=export_command)


def export_command(args) -> int:
    print(f"exported -> {export_model(args.model, args.out, args.format, args.force, args.outtype)}")
    return 0
