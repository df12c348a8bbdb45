python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD STEPQUANT_SHARED=$PWD/.shared || exit
nvidia-smi --query-gpu=name --format=csv,noheader; date -u
mkdir -p /tmp/m && python3 -c "
import sys; sys.argv=['x']; sys.path.insert(0,'benchmarks')
from pathlib import Path; import vs_modelopt; vs_modelopt.generate(Path('/tmp/m'))"; date -u
timeout 240 python3 benchmarks/profile_convert.py /tmp/m 2>&1 | grep -v "it/s\]" | head -200; date -u
