# The README's two set-up commands: `make demo` (embedded study) and `make test`.
# Both create the project venv if it is missing and install the package into it.
VENV := .venv
STAMP := $(VENV)/.installed
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: demo test lint dry-run clean-demo report paper-shaped

$(STAMP): pyproject.toml
	test -x $(VENV)/bin/python || python3 -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $@

demo: $(STAMP)
	snakemake --profile workflow/profiles/default --configfile config/demo.yaml

test: $(STAMP)
	python -m pytest

# The paper-shaped run: config/config.yaml shrunk by `dnnmod study shrink` (every rule,
# architecture, approach, recipe, dataset format and class count; small sizes), on small
# official-format archives served by a local HTTP mirror; results/paper_shaped. CORES=2.
paper-shaped: $(STAMP)
	.ci/paper_shaped

# The study's HTML report (results/<study>/report.html) from the results already there, pulled
# ones included: only the E8 cost table and the report run; nothing upstream is recomputed,
# however new its files' timestamps. `make report CONFIG=config/config.yaml STUDY=paper`.
CONFIG ?= config/demo.yaml
STUDY ?= demo
report: $(STAMP)
	snakemake --profile workflow/profiles/default --configfile $(CONFIG) \
		--allowed-rules table_cost study_report --forcerun table_cost study_report \
		-- results/$(STUDY)/report.html

lint: $(STAMP)
	ruff check src tests benchmarks
	snakefmt --check Snakefile workflow/rules
	snakemake --lint --configfile config/demo.yaml

dry-run: $(STAMP)
	snakemake -n --configfile config/demo.yaml
	snakemake -n --configfile config/demo_long.yaml
	snakemake -n --configfile config/medium.yaml
	snakemake -n --configfile config/config.yaml

clean-demo:
	rm -rf results/demo
