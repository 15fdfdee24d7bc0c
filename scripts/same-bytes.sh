#!/usr/bin/env bash
# Behaviour check for refactors: runs one phlora binary over a fixed set of CPU extractions,
# merges and analyses, and lists the SHA-256 of every output that must not change (adapter
# tensors and config, merged checkpoints, analysis CSV, verify's JSON). Run it with the old and
# the new binary and compare the two lists:
#
#   scripts/same-bytes.sh OLD_BIN /tmp/sb-old >/tmp/old.sha
#   scripts/same-bytes.sh NEW_BIN /tmp/sb-new >/tmp/new.sha
#   diff /tmp/old.sha /tmp/new.sha && echo same bytes
#
# Optional: FT_PAIR=DIR with DIR/base and DIR/domain (a genuine fine-tune, scripts/make_finetune.py)
# adds that pair; FAMILY_PAIRS=DIR (scripts/family_pairs.py DIR) adds MoE (per-expert, fused,
# gpt-oss), GPT-2 Conv1D and added-token pairs, each extracted and merged back. report.json, analysis.json and the plots carry timings or floats formatted for
# people and are left out; their numbers are in the CSV.
set -euo pipefail
bin=$(realpath "$1")
out=$2
rm -rf "$out"
mkdir -p "$out"
cd "$out"

q() { "$bin" -q "$@" >/dev/null; }
synth() { # dir, vocabulary, then synth arguments
    local d=$1 vocab=$2; shift 2
    q synth --out "$d" --hidden 256 --intermediate 512 --layers 2 --vocab "$vocab" --heads 4 \
        --kv-heads 2 --delta-rank 24 --seed 7 --shard-mib 1 "$@"
}
x() { # name, pair, then extract arguments
    local name=$1 pair=$2; shift 2
    q extract --base "$pair/base" --ft "$pair/ft" --out "$name" --device cpu "$@"
    [[ " $* " == *" --shard "* ]] ||
        "$bin" -q verify --base "$pair/base" --ft "$pair/ft" --adapter "$name" --json >"$name/verify.json"
}

synth bf16 1024
synth tied 1024 --tie-embeddings --dtype f16
synth f32 1024 --dtype f32 --noise 0.5
synth big 4096

x r16 bf16 -r 16
x r8-exact bf16 -r 8 --svd exact
x energy bf16 --energy 0.8 --max-rank 32
for rule in balanced relative frobenius base uniform; do
    x "budget-$rule" bf16 --budget 60000 --rank-rule "$rule"
done
x budget-min bf16 --budget 60000 --min-rank 4
x shift bf16 -r 8 --remove-logit-shift --out-dtype f32
x no-embed bf16 -r 8 --no-embeddings --exclude '*.mlp.down_proj*' --out-dtype f16
x bias bf16 -r 8 --lora-bias --no-embeddings --no-norms --oversample 4 --power-iters 1 --seed 3
x shards bf16 -r 8 --max-shard-size 40K --portable
x rows big -r 64 --max-ram 75M
x in-flight bf16 -r 8 --in-flight 1
x tied tied -r 12
x f32 f32 -r 16 --target vllm
x part1 bf16 -r 8 --shard 1/2
x part2 bf16 -r 8 --shard 2/2
q combine --out combined part1 part2
q merge --base bf16/base --adapter r16 --out merged
q analyze --base bf16/base --ft bf16/ft --out analysis --budget 60000 --ranks 4,8 --max-rank 32
if [ -n "${FT_PAIR:-}" ]; then
    q extract --base "$FT_PAIR/base" --ft "$FT_PAIR/domain" --out ft-r16 --device cpu -r 16
    q extract --base "$FT_PAIR/base" --ft "$FT_PAIR/domain" --out ft-budget --device cpu \
        --budget 2000000
fi
if [ -n "${FAMILY_PAIRS:-}" ]; then
    f=$FAMILY_PAIRS
    fx() { # name, pair, then extract arguments
        local name=$1 p=$2; shift 2
        q extract --base "$f/$p/base" --ft "$f/$p/ft" --out "$name" --device cpu "$@"
        "$bin" -q verify --base "$f/$p/base" --ft "$f/$p/ft" --adapter "$name" --json >"$name/verify.json"
        q merge --base "$f/$p/base" --adapter "$name" --out "$name-merged"
    }
    fx mixtral mixtral -r 8
    fx qwen2moe qwen2moe -r 8
    fx qwen2moe-fused qwen2moe -r 8 --fuse-experts
    fx qwen2moe-budget qwen2moe --budget 150000 --fuse-experts
    fx mixtral-budget mixtral --budget 100000
    fx mixtral-vllm mixtral -r 8 --target vllm
    fx fused fused -r 8
    fx fused-budget fused --budget 100000
    fx gptoss gptoss -r 8
    fx gpt2 gpt2 -r 8
    fx gpt2-bias gpt2 -r 8 --lora-bias --no-embeddings
    fx added added -r 8 --added-tokens
fi
find . -type f \( -name '*.safetensors' -o -name 'adapter_config.json' -o -name '*.index.json' \
    -o -name 'analysis.csv' -o -name 'verify.json' -o -path './merged/*.json' \) ! -path './*/base/*' ! -path './*/ft/*' \
    | LC_ALL=C sort | xargs sha256sum
