# The README's commands. `make test` is what CI runs.
.PHONY: test lint unit build demo quickstart

# The whole suite: format, lints, unit tests and the privileged namespace tests (run as root).
test:
	bash scripts/test.sh

lint:
	cargo fmt --all -- --check
	cargo clippy --all-targets -- -D warnings

unit:
	cargo test --lib

build:
	cargo build --release --bin cordon --examples

# Boots cordon as PID 1 in fresh namespaces with a demo agent (root; Ctrl-C stops it).
demo: build
	bash scripts/demo.sh

# Builds the image, starts it with the demo agent and joins the agent's session (needs Docker).
quickstart:
	bash scripts/quickstart.sh
