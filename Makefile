# The README's two set-up commands: `make demo` (embedded study) and `make test`.
# Both create the project venv if it is missing and install the package into it.
VENV := .venv
STAMP := $(VENV)/.installed
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: demo test lint dry-run clean-demo

$(STAMP): pyproject.toml
	test -x $(VENV)/bin/python || python3 -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $@

demo: $(STAMP)
	snakemake --profile workflow/profiles/default --configfile config/demo.yaml

test: $(STAMP)
	python -m pytest

lint: $(STAMP)
	ruff check src tests benchmarks
	snakefmt --check Snakefile workflow/rules
	snakemake --lint --configfile config/demo.yaml

dry-run: $(STAMP)
	snakemake -n --configfile config/demo.yaml
	snakemake -n --configfile config/medium.yaml
	snakemake -n --configfile config/config.yaml

clean-demo:
	rm -rf results/demo
