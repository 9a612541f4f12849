#!/usr/bin/env bash
# sim.sh NAME TOP "SOURCES" "PARAMS" VECDIR [ARGS...]: build bench TOP with each simulator in
# $SIMS (default: verilator iverilog), run it in VECDIR (where its .hex vectors are), and
# require a PASS line and no FAIL line. PARAMS: "R=2 C=3 ..." (module parameters of TOP).
set -euo pipefail
name=$1 top=$2 sources=$3 params=$4 vec=$5
shift 5
B=$(realpath -m "${B:-build}")
mkdir -p "$B"
for s in ${SIMS:-verilator iverilog}; do
  out=$B/$name.$s.log
  if [ "$s" = verilator ]; then
    # One build per bench and parameters, reused by every case run with them.
    gflags=(); for p in $params; do gflags+=("-G$p"); done
    obj=$B/obj-$top${params:+-${params// /-}}
    obj=${obj//=/}
    if [ ! -x "$obj/V$top" ] || [ -n "$(find $sources rtl -newer "$obj/V$top" 2>/dev/null | head -1)" ]; then
      verilator --binary -j 2 -Wno-fatal -Wno-lint -Wno-style -Wno-WIDTH -Irtl --top-module "$top" \
        "${gflags[@]}" $sources -Mdir "$obj" > "$B/build-$name.log" 2>&1 || { cat "$B/build-$name.log"; exit 1; }
    fi
    (cd "$vec" && "$obj/V$top" "$@") > "$out" 2>&1 || true
  else
    pflags=(); for p in $params; do pflags+=("-P$top.$p"); done
    vvp=$B/$top${params:+-${params// /-}}.vvp
    vvp=${vvp//=/}
    if [ ! -f "$vvp" ] || [ -n "$(find $sources rtl -newer "$vvp" 2>/dev/null | head -1)" ]; then
      iverilog -g2005 -Irtl -s "$top" "${pflags[@]}" -o "$vvp" $sources
    fi
    (cd "$vec" && vvp -n "$vvp" "$@") > "$out" 2>&1 || true
  fi
  if grep -q '^PASS' "$out" && ! grep -q '^FAIL' "$out"; then
    echo "PASS $name [$s] $(grep -E '^(mesh|fifo|router|numeric|fp|units)' "$out" | head -1)"
  else
    cat "$out"
    echo "FAIL $name [$s]"
    exit 1
  fi
done
