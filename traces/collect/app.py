"""``moesim-collect``: the Hydra command line of :func:`traces.collect.collect`.

Bad input (missing file, not an MoE model, unreadable prompts, mismatched work dir) prints one
``error:`` line and exits with status 2; nothing is left half-written because the trace and the
router file are renamed into place only when complete.
"""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

from moesim.traces.collect.collector import CollectSettings, collect
from moesim.traces.collect.errors import CollectError
from moesim.traces.errors import TraceError

CONF_DIR = Path(__file__).parent / "conf"
USER_ERRORS = (CollectError, TraceError, MissingMandatoryValue, OmegaConfBaseException, OSError)


def settings_from_cfg(cfg: DictConfig) -> CollectSettings:
    """Map the Hydra config onto :class:`CollectSettings` (resolves ``embedded`` shortcuts)."""
    from moesim.traces.collect.embedded import MODEL_DIR, PROMPTS_FILE

    path = str(cfg.model.path)
    tokenizer = str(cfg.model.tokenizer)
    name = cfg.model.name
    if path == "embedded":
        path = str(MODEL_DIR)
        tokenizer = "bytes" if tokenizer == "auto" else tokenizer
        name = name or "moesim_tiny_moe"
    prompts = str(cfg.prompts.path)
    if prompts == "embedded":
        prompts = str(PROMPTS_FILE)
    return CollectSettings(
        model_path=path,
        prompts=prompts,
        out=str(cfg.out),
        model_name=None if name is None else str(name),
        tokenizer=tokenizer,
        dtype=str(cfg.model.dtype),
        device=str(cfg.device),
        trust_remote_code=bool(cfg.model.trust_remote_code),
        device_map=None if cfg.model.device_map is None else str(cfg.model.device_map),
        prompt_field=None if cfg.prompts.field is None else str(cfg.prompts.field),
        prompt_split=str(cfg.prompts.split),
        limit=None if cfg.prompts.limit is None else int(cfg.prompts.limit),
        max_prompt_tokens=int(cfg.prompts.max_prompt_tokens),
        max_new_tokens=int(cfg.max_new_tokens),
        stop_at_eos=bool(cfg.stop_at_eos),
        hidden_states=bool(cfg.record.hidden_states),
        router_probs=bool(cfg.record.router_probs),
        work_dir=None if cfg.work_dir is None else str(cfg.work_dir),
        keep_parts=bool(cfg.keep_parts),
        progress=bool(cfg.progress),
        expert_dtype_bytes=int(cfg.expert_dtype_bytes),
        seed=int(cfg.seed),
        threads=None if cfg.threads is None else int(cfg.threads),
    )


@hydra.main(config_path=str(CONF_DIR), config_name="collect", version_base="1.3")
def _hydra_main(cfg: DictConfig) -> None:
    try:
        OmegaConf.to_container(cfg, throw_on_missing=True)
        result = collect(settings_from_cfg(cfg))
    except MissingMandatoryValue as exc:
        print(f"error: missing value for {exc.full_key} (set {exc.full_key}=...)", file=sys.stderr)
        sys.exit(2)
    except USER_ERRORS as exc:
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(f"error: {msg}", file=sys.stderr)
        sys.exit(2)
    s = result.summary
    print(
        f"wrote {result.trace}: {s.requests} requests, {s.tokens} tokens, {s.rows} rows "
        f"({result.resumed_requests} resumed); routers: {result.routers}"
    )


def main() -> None:
    _hydra_main()


if __name__ == "__main__":
    main()
