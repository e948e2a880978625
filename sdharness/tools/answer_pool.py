"""The answer-only pool of a built-in task's config: the training problems it would train on, as
``{problem, answer}`` JSONL with the worked solutions left out, for ``sdharness-bootstrap``.

The answer-only regime trains on the same problems and splits as the main protocol while its methods
see only problem and answer::

    python -m sdharness.tools.answer_pool --out pool.jsonl experiment=protocol
    sdharness-bootstrap --model testbed --prompt testbed -k 8 --problems pool.jsonl --out solved.jsonl
    sdharness-train experiment=protocol method=sd_clip data.solutions_path=solved.jsonl

The overrides are ``sdharness-train``'s. The pool is the training split after the validation split is
held out (neither the validation nor the eval problems are in it), in the training split's order; a run
with ``data.solutions_path`` takes its references from the solved file and keeps the task's own
validation and eval splits (:func:`sdharness.data.loading.with_solutions`).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import ConfigCompositionException, OverrideParseException

from sdharness.cli import composition_error_message
from sdharness.config import CONF_DIR, ConfigError, DataConfig, register_configs, to_train_config
from sdharness.data import SOURCES
from sdharness.data.loading import load_data
from sdharness.errors import DataError
from sdharness.tools.provenance import atomic_write


def answer_pool(data: DataConfig) -> list[dict]:
    """The training problems of ``data`` (validation held out), each as ``{problem, answer}``."""
    if not SOURCES[data.name].built_in_task:
        raise ConfigError(f"data={data.name}: the answer-only pool is written for the built-in task (data=arithmetic); "
                          "for your own file, write its rows without the solution field")
    loaded = load_data(replace(data, solutions_path=None))
    return [{"problem": row["problem"], "answer": row["answer"]} for row in loaded.train]


def compose_train_config(overrides: list[str]):
    """``sdharness-train``'s config under ``overrides``, validated."""
    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return to_train_config(compose(config_name="train", overrides=overrides))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m sdharness.tools.answer_pool", description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="the JSONL to write ({problem, answer} per line)")
    parser.add_argument("overrides", nargs="*", help="sdharness-train overrides, e.g. experiment=protocol")
    args = parser.parse_args(argv)
    try:
        rows = answer_pool(compose_train_config(args.overrides).data)
    except (ConfigCompositionException, OverrideParseException) as error:
        print(f"answer_pool: error: {composition_error_message(error)}", file=sys.stderr, flush=True)
        sys.exit(2)
    except (ConfigError, DataError) as error:
        print(f"answer_pool: error: {error}", file=sys.stderr, flush=True)
        sys.exit(2)
    atomic_write(Path(args.out), "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    print(f"{len(rows)} training problem(s), answers only -> {args.out}", flush=True)


if __name__ == "__main__":
    main()
