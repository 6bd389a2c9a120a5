"""Model code that a Baichuan-layout export ships beside its weights, for ``trust_remote_code=True``.

The Baichuan 2 release's ``config.json`` names ``configuration_baichuan.BaichuanConfig``,
``modeling_baichuan.BaichuanForCausalLM`` and ``tokenization_baichuan.BaichuanTokenizer`` in its
``auto_map``; transformers imports those from the model directory itself. These three files are haina's own
implementation of that layout (RoPE and ALiBi in one modeling file, chosen by the config). They run in a
user's transformers without haina installed, so they import only torch, transformers, sentencepiece and the
standard library, and nothing in haina imports them: they are leaves, copied, never executed here.
"""

from __future__ import annotations

import shutil
from pathlib import Path

FILES = ("configuration_baichuan.py", "modeling_baichuan.py", "tokenization_baichuan.py")


def copy_to(out: Path) -> list[Path]:
    """Copy the three files into the model directory ``out``; returns their new paths."""
    here = Path(__file__).resolve().parent
    copied = []
    for name in FILES:
        shutil.copyfile(here / name, out / name)
        copied.append(out / name)
    return copied
