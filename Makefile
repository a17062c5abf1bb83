# The README's two commands. Each sets itself up (./.venv) on a fresh machine.
.PHONY: demo test setup gpu-test bench

setup:
	@bash scripts/setup_env.sh

demo: setup
	.venv/bin/python -m megamoe.demo

test: setup
	.venv/bin/python -m pytest -q tests

gpu-test: setup
	.venv/bin/python -m pytest -q -m "gpu" tests
