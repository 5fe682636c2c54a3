# Each target makes its own environment first (see scripts/bootstrap.sh), so it works on a fresh machine.
.PHONY: demo test lint bench mutants

demo:
	@bin=$$(scripts/bootstrap.sh) && "$$bin/python" -m odysseus.demo

test:
	@bin=$$(scripts/bootstrap.sh) && "$$bin/python" -m pytest -q

lint:
	@bin=$$(scripts/bootstrap.sh) && "$$bin/ruff" check . && "$$bin/ruff" format --check .

bench:
	@bin=$$(scripts/bootstrap.sh) && "$$bin/python" perf/comm_volume.py

mutants:
	@bin=$$(scripts/bootstrap.sh) && "$$bin/python" scripts/mutants.py
