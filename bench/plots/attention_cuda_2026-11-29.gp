# gnuplot attention_cuda_2026-11-29.gp  (from bench/plots)
set terminal pngcairo size 900,480
set output 'attention_cuda_2026-11-29.png'
set title 'Block-sparse attention on the H200 (B=1, H=32, d=128, bf16, causal, block 128)'
set style data histograms
set style histogram cluster gap 1
set style fill solid 0.8 border -1
set logscale y
set ylabel 'ms (log scale, lower is better)'
set xtics rotate by -30
set key top left
plot 'attention_cuda_2026-11-29.dat' using 2:xtic(1) title 'cuDNN SDPA (dense)', \
     '' using 3 title 'FlexAttention (same lists)', \
     '' using 4 title 'ours (mma.sync)'
