-- wrk script: HTTP/1.1 pipelining, DEPTH requests per write (`-s pipeline.lua URL -- DEPTH`,
-- default 16). wrk counts each response; its latency is per batch.
init = function(args)
   local depth = tonumber(args[1]) or 16
   local r = {}
   for i = 1, depth do
      r[i] = wrk.format(nil, wrk.path)
   end
   req = table.concat(r)
end

request = function()
   return req
end

done = function(summary, latency, requests)
   local e = summary.errors
   io.write(string.format(
      "JSON {\"requests\":%d,\"duration_us\":%d,\"errors\":%d,\"status_errors\":%d,\"p50_us\":%d,\"p99_us\":%d,\"mean_us\":%.1f}\n",
      summary.requests, summary.duration, e.connect + e.read + e.write + e.timeout, e.status,
      latency:percentile(50), latency:percentile(99), latency.mean))
end
