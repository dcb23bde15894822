#!/usr/bin/env bash
# Session 9, call 2: call 1 plus graph timing of one read of 128 MB against two PDL-chained reads of 64 MB;: the read-bandwidth probe (notes/probes/stream_probe.cu): the mma
# expand's pattern (each warp a run of 2 KB tiles) with 1..8 tiles in flight per warp.
set -u
R=$OUT/r; mkdir -p $R
nvcc -O3 -std=c++17 -arch=sm_90 notes/probes/stream_probe.cu -o $R/stream_probe > $R/build.log 2>&1
$R/stream_probe > $R/probe.log 2>&1; cat $R/probe.log; rm -f $R/stream_probe
tar czf $OUT/$(basename $0 .sh).tgz -C $OUT r; rm -rf $R
