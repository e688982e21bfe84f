"""Small shapes for executor tests: a 4-layer, 8-expert SwiGLU card whose experts are 48 KiB,
so a weights file is a few hundred KiB and a run takes well under a second."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from moesim.traces.model_card import ModelCard, card_from_mapping
from moesim.traces.trace import Trace
from tests.helpers import random_trace


def small_card(layers: int = 4, experts: int = 8, top_k: int = 2) -> ModelCard:
    return card_from_mapping({
        "name": f"test_card_l{layers}_e{experts}", "hidden_size": 64,
        "moe_intermediate_size": 64, "num_experts": experts, "top_k": top_k,
        "num_layers": layers, "moe_layers": list(range(layers)), "num_attention_heads": 4,
        "num_kv_heads": 4, "head_dim": 16, "dtype": "float32", "gated": True,
    })


def card_trace(card: ModelCard, seed: int = 0, requests: int = 2, tokens: int = 12) -> Trace:
    """A Zipf-skewed random trace with the card's shape and expert bytes."""
    tr = random_trace(num_requests=requests, tokens=tokens, layers=card.num_moe_layers,
                      experts=card.num_experts, top_k=card.top_k, seed=seed, skew=1.2)
    return Trace(replace(tr.meta, expert_bytes=card.expert_bytes), tr.requests)


@pytest.fixture(scope="session")
def work_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Weights files for the session, on the disk under the test temp folder (not tmpfs)."""
    return tmp_path_factory.mktemp("executor_work")
