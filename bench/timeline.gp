# Draws the outage timeline bench/resync.sh samples (bench/timeline.py) as one SVG:
# primary write IOPS, the journal's lag (pool bytes not yet durable, dirty bytes waiting for a
# resync) and the replica's lag behind the primary's head, on one time axis, with the outage
# shaded and the returns to `logging` and to replica = primary marked.
#
#   gnuplot -e "data='timeline.tsv'; out='x.svg'; kill=12.3; back=32.4; logging=40.1; same=45.0" bench/timeline.gp
set terminal svg size 960,760 dynamic noenhanced font "sans,12" background "white"
set output out
set datafile separator "\t"
set key top left opaque box
set grid ytics lc rgb "#dddddd"
set xrange [0:*]
set yrange [0:*]
set lmargin 12
set rmargin 4
set style line 1 lc rgb "#1f77b4" lw 1.5
set style line 2 lc rgb "#d62728" lw 1.5
set style line 3 lc rgb "#ff7f0e" lw 1.5
set style line 4 lc rgb "#2ca02c" lw 1.5
set object 1 rect from kill, graph 0 to back, graph 1 fc rgb "#f4cccc" fs solid 0.6 noborder behind
set arrow 1 from logging, graph 0 to logging, graph 1 nohead lc rgb "#555555" dt 2
set arrow 2 from same, graph 0 to same, graph 1 nohead lc rgb "#2ca02c" dt 2
set multiplot layout 3,1 title sprintf("tinylag: a %.0f s store outage under 4k random writes (sampled from the daemons' own /metrics)", back - kill)
set ylabel "primary write IOPS"
set format x ""
set key bottom center
set label 1 "store down" at (kill + back) / 2, graph 0.5 center front
plot data using 1:2 skip 1 with lines ls 1 title "rate of tinylag_primary_requests_total{op=\"write\"}"
unset label 1
set key top left
set ylabel "journal lag (MiB)"
plot data using 1:3 skip 1 with lines ls 2 title "not yet durable (tinylag_journal_lag_bytes)", \
     data using 1:4 skip 1 with lines ls 3 title "dirty, waiting for resync (tinylag_dirty_bytes)"
set ylabel "replica lag (records)"
set xlabel "seconds (dashed: store back to logging mode; green: replica = primary)"
set format x "%g"
plot data using 1:5 skip 1 with lines ls 4 title "head_lsn - replica_applied_lsn"
unset multiplot
