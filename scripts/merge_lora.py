"""Merge a LoRA adapter into its base model and save a servable model folder.

The output holds everything the service (and vLLM) needs: ``config.json``, the merged weights
(``model.safetensors``), ``generation_config.json``, the tokenizer with its chat template and the
label set (``labels.json``, from the adapter, else the base). Point ``model.model_source`` of
``configs/serve_config.yaml`` at it.

    python scripts/merge_lora.py --base models/tiny-qwen3 --adapter models/tiny-qwen3-lora --out models/tiny-qwen3-merged
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

from deployments import classification as clf

REPO = Path(__file__).resolve().parents[1]


def merge(base: Path, adapter: Path, out: Path, dtype: str = "auto") -> Path:
    """Merge ``adapter`` into ``base`` and write the result to ``out`` (replaced as a whole:
    written next to it first, then renamed into place)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    torch_dtype = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[
        dtype
    ]
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch_dtype)
    model = PeftModel.from_pretrained(model, adapter)
    merged = model.merge_and_unload()
    out = out.resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        merged.save_pretrained(tmp, safe_serialization=True)
        tok_src = adapter if (adapter / "tokenizer_config.json").is_file() else base
        AutoTokenizer.from_pretrained(tok_src).save_pretrained(tmp)
        try:
            GenerationConfig.from_pretrained(base).save_pretrained(tmp)
        except OSError:
            pass  # the base has none
        for src in (adapter, base):
            if (src / clf.LABELS_FILENAME).is_file():
                shutil.copyfile(src / clf.LABELS_FILENAME, tmp / clf.LABELS_FILENAME)
                break
        tmp.chmod(0o755)
        old = None
        if out.exists():
            old = out.with_name(f".{out.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            out.rename(old)
        tmp.rename(out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    ap.add_argument("--base", type=Path, required=True, help="base model folder")
    ap.add_argument("--adapter", type=Path, required=True, help="peft LoRA adapter folder")
    ap.add_argument("--out", type=Path, required=True, help="merged model folder (replaced)")
    ap.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="weights dtype (auto: the base's)",
    )
    args = ap.parse_args(argv)
    for p in (args.base, args.adapter):
        if not p.is_dir():
            print(f"error: not a folder: {p}", file=sys.stderr)
            return 2
    if not (args.adapter / "adapter_config.json").is_file():
        print(f"error: {args.adapter} has no adapter_config.json", file=sys.stderr)
        return 2
    out = merge(args.base, args.adapter, args.out, args.dtype)
    print(f"merged {args.adapter} into {args.base} -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
