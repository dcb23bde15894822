#!/usr/bin/env bash
# Session 9, call 2: the read-bandwidth probe again (notes/probes/stream_probe.cu), now also
# graph-timed: one 128 MB read against two PDL-chained 64 MB reads, and a 1 GiB copy.
set -u
R=$OUT/r; mkdir -p $R
nvcc -O3 -std=c++17 -arch=sm_90 notes/probes/stream_probe.cu -o $R/stream_probe > $R/build.log 2>&1
$R/stream_probe > $R/probe.log 2>&1; cat $R/probe.log; rm -f $R/stream_probe
tar czf $OUT/$(basename $0 .sh).tgz -C $OUT r; rm -rf $R
