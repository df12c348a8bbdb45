mkdir -p /tmp/smolparts && cp .smol_a/part_aa /tmp/smolparts/ && ls -la /tmp/smolparts && nvidia-smi --query-gpu=name --format=csv,noheader
