# Two commands on a fresh machine; each first creates .venv and installs requirements.txt if needed.
.PHONY: study quick test setup
study:  # the whole study (reproduce.py), MNIST from ../shared/mnist or downloaded
	scripts/study.sh
quick:  # a one-seed, one-epoch pipeline check into results/quick/
	scripts/study.sh --quick
test:   # the test suite, as CI runs it (.ci/run)
	scripts/test.sh
setup:  # only the .venv
	scripts/setup.sh
