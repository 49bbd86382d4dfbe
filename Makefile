# Two commands for a new machine: `make demo` (reconstruct the sample) and `make test`.
PYTHON ?= python3
OUT ?= out/demo
SAMPLE := data-samples/lu177-iec

CHAIN ?= out/chain-demo
STAMP := build/.installed

.PHONY: install system-deps demo demo-chain test bench

# dciodvfy validates DICOM outputs; Orthanc and dcmtk are the PACS and the camera in the flow tests
# (dcmtk's tools by full path: pynetdicom installs commands of the same names); Chromium renders reports;
# PostgreSQL (a throw-away cluster per test session) checks the results store on a real server; a C compiler
# with OpenMP builds the PET list-mode kernel on first use (without one the slower PyTorch path runs).
system-deps:
	@if ! command -v dciodvfy >/dev/null || ! command -v Orthanc >/dev/null || [ ! -x /usr/bin/storescu ] \
	  || [ ! -e /usr/share/orthanc/plugins/libOrthancDicomWeb.so ] || [ ! -x /usr/bin/chromium ] \
	  || ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || ! command -v gcc >/dev/null; then \
	  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q dicom3tools dcmtk orthanc orthanc-dicomweb chromium postgresql gcc; fi

# torch first, pinned to the CPU build on disk; the project's own range stays open (torch>=2.4).
# rt-utils (a PyTomography dependency) drags in the `dataclasses` backport, which breaks Prefect: remove it.
# pip runs again only when pyproject.toml changed since the last install (build/.installed).
install: system-deps $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m pip install -q torch==2.13.0
	$(PYTHON) -m pip install -q -e '.[test]'
	$(PYTHON) -m pip uninstall -y -q dataclasses 2>/dev/null || true
	@mkdir -p $(dir $(STAMP)) && touch $(STAMP)

demo: install
	theraflow recon spect --nm $(SAMPLE)/nm/projections.dcm --ct $(SAMPLE)/ct --registry $(SAMPLE)/sensitivity.json --out $(OUT)

# The whole chain after a scan on the samples: a PSMA PET/CT with its SEG, a Lu-177 SPECT/CT at two
# time points of one cycle, Ga-68 list mode with its CT, dropped in a watched folder; one scan.
demo-chain: install
	rm -rf $(CHAIN) && $(PYTHON) -m flows.samples $(CHAIN)/inbox
	theraflow run after-scan --watch $(CHAIN)/inbox --once --settle 0 --store $(CHAIN)/results.sqlite --out $(CHAIN)/results \
	  --sink $(CHAIN)/pacs --set registry=$(SAMPLE)/sensitivity.json
	theraflow results --store $(CHAIN)/results.sqlite

test: install
	$(PYTHON) -m pytest

bench: install
	$(PYTHON) bench/bench_spect.py
	$(PYTHON) bench/bench_projector.py --threads 2
