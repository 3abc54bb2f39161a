# The two set-up commands of the README:
#   make demo   runs nanogate end to end on a local, real control plane
#   make test   runs the whole test suite (what CI runs through .ci/run)
# Both install what a fresh Debian machine lacks (e2e/scripts/setup.sh) and cache heavy
# builds under ~/.cache/nanogate.

CARGO ?= cargo
export CARGO_TERM_COLOR ?= never
# Seconds each fuzz target runs in `make fuzz` (and so in `make test`).
FUZZ_SECONDS ?= 60

.PHONY: demo test setup fmt-check clippy alerts-test unit-and-e2e bench fuzz

setup:
	bash e2e/scripts/setup.sh

demo: setup
	$(CARGO) build -p nanogate-sidecar -p nanogate-operator -p nanogate-e2e --bins
	$(CARGO) run -q -p nanogate-e2e --bin nanogate-demo

test: setup fmt-check clippy alerts-test unit-and-e2e fuzz

fmt-check:
	$(CARGO) fmt --all -- --check

clippy:
	$(CARGO) clippy --workspace --all-targets -- -D warnings

# The chart's alerting rules (charts/nanogate/files/alerts.yaml, the PrometheusRule's spec):
# syntax, then a firing and a quiet case per alert (promtool from the Debian package
# prometheus, which setup installs).
PROMTOOL ?= promtool
alerts-test:
	@command -v $(PROMTOOL) >/dev/null || { echo "promtool not found: apt-get install prometheus"; exit 1; }
	$(PROMTOOL) check rules charts/nanogate/files/alerts.yaml
	$(PROMTOOL) test rules e2e/alerts/alerts_test.yaml

# Builds every binary first: integration tests run the real nano-agent and operator processes.
unit-and-e2e:
	$(CARGO) build --workspace --bins
	$(CARGO) test --workspace --no-fail-fast

# Every cargo-fuzz target of fuzz/ for FUZZ_SECONDS each, from the seed corpus fuzz/corpus/
# (nightly toolchain; build cached in ~/.cache/nanogate/fuzz-target). A crash fails the target
# and prints where its input is and how to replay it. `make fuzz FUZZ_SECONDS=600` fuzzes longer.
fuzz: setup
	FUZZ_SECONDS=$(FUZZ_SECONDS) bash fuzz/run.sh
