# Sourced by bench/run.sh and bench/profile.sh: which OpenBLAS kernel families to measure.
# Sets FAMILIES (an array) unless the caller filled it: the machine's own OPENBLAS_CORETYPE
# when set (it is there for correctness: keep it), else SkylakeX where the CPU has AVX-512
# F/BW/DQ/VL and Haswell where it has AVX2 + FMA; "" (OpenBLAS's own choice) when neither.
# Also defines has FLAG (the CPU's /proc/cpuinfo flags).
sy_cpu_flags=$(grep -m1 '^flags' /proc/cpuinfo)
has() { [[ " $sy_cpu_flags " == *" $1 "* ]]; }
if [ -n "${OPENBLAS_CORETYPE:-}" ]; then
    FAMILIES=("$OPENBLAS_CORETYPE")
elif [ ${#FAMILIES[@]} -eq 0 ]; then
    if has avx512f && has avx512bw && has avx512dq && has avx512vl; then FAMILIES+=(SkylakeX); fi
    if has avx2 && has fma; then FAMILIES+=(Haswell); fi
    [ ${#FAMILIES[@]} -gt 0 ] || FAMILIES=("")
fi
