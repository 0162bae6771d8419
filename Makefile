# The two commands of the README. Both build .venv from the pinned dependencies when it is missing.
PY := .venv/bin/python

.PHONY: repro test venv

venv: .venv/.installed

.venv/.installed: pyproject.toml
	python3 -m venv .venv
	.venv/bin/pip install -q --upgrade pip
	.venv/bin/pip install -q -e '.[test]'
	touch $@

# the main job: regenerate every stage whose inputs changed (as `dvc repro` would, stages side by side where the
# graph and the cores allow: pipeline/repro.py), then the README's generated results section
repro: venv
	. .venv/bin/activate && python pipeline/repro.py
	$(PY) -m dmdr.report readme

test: venv
	$(PY) -m pytest
