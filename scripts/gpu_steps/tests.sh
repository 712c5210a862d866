# tests: every test, cuda-marked ones included (TESTS="path ..." picks a part; each test's
#   result is logged as it finishes, so a run cut by TEST_TIMEOUT still shows what passed);
#   with 2+ GPUs the tensor-parallel tests (tests/distributed, NCCL) run beside the rest
# (sourced by scripts/gpu_check.sh, whose helpers - pytest, want - and variables - OUT, rc, steps - it uses)
ngpu=$(nvidia-smi -L | wc -l)
if [ "$ngpu" -ge 2 ]; then
  (pytest tests/distributed >"$OUT/pytest_tp.log" 2>&1; echo "exit $?" >>"$OUT/pytest_tp.log") &
  pytest --durations=15 ${TESTS:-tests} --ignore=tests/distributed >"$OUT/pytest_gpu.log" 2>&1
  rc=$?
  wait
  echo "== tensor parallel ($ngpu GPUs) =="; tail -25 "$OUT/pytest_tp.log"
  grep -q "^exit 0" "$OUT/pytest_tp.log" || rc=1
else
  pytest --durations=15 ${TESTS:-tests} >"$OUT/pytest_gpu.log" 2>&1
  rc=$?
fi
grep -E "FAILED|ERROR" "$OUT/pytest_gpu.log" | grep -v "^FAILED\|^ERROR" | head -20
tail -25 "$OUT/pytest_gpu.log"
