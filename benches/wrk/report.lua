-- wrk script: prints one machine-readable line at the end (read by benches/compare.py).
done = function(summary, latency, requests)
   local e = summary.errors
   io.write(string.format(
      "JSON {\"requests\":%d,\"duration_us\":%d,\"errors\":%d,\"status_errors\":%d,\"p50_us\":%d,\"p99_us\":%d,\"mean_us\":%.1f}\n",
      summary.requests, summary.duration, e.connect + e.read + e.write + e.timeout, e.status,
      latency:percentile(50), latency:percentile(99), latency.mean))
end
