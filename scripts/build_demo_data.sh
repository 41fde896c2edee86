#!/usr/bin/env bash
# Tokenizer and shards of the demo corpus (committed; rerun after changing the corpus):
#   python scripts/build_demo_corpus.py --out data/demo --work /tmp/demo_corpus_work
#   bash scripts/build_demo_data.sh
set -euo pipefail
cd "$(dirname "$0")/.."
python -m orchestrator.data.tokenizer train --input data/demo/raw/*.jsonl.gz \
  --output data/demo/tokenizer --vocab-size 2000 --threads 2
rm -f data/demo/tokenizer.vocab
for source in code books reference arxiv qa; do
  python -m orchestrator.data.preprocess --input "data/demo/raw/$source.jsonl.gz" \
    --output-prefix "data/demo/shards/$source" --tokenizer data/demo/tokenizer.model --workers 2
done
