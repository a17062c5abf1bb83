# The README's two commands. Each sets itself up (./.venv) on a fresh machine.
.PHONY: demo test lint setup gpu-test bench

setup:
	@bash scripts/setup_env.sh

demo: setup
	.venv/bin/python -m megamoe.demo

test: setup lint
	.venv/bin/python -m pytest -q --durations=15 tests

lint: setup
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .

gpu-test: setup
	.venv/bin/python -m pytest -q -m "gpu" tests
