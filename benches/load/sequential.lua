-- wrk: GET PREFIX-START, PREFIX-START+1, ... PREFIX-(START+COUNT-1) once each, then stop.
-- (Requests already in flight when the last id is sent repeat it; they are hits.)
local prefix = os.getenv("RUN_PREFIX") or "done"
local start = tonumber(os.getenv("RUN_START") or "0")
local count = tonumber(os.getenv("RUN_COUNT") or "1000")
local next_id = start
request = function()
  local id = math.min(next_id, start + count - 1)
  next_id = next_id + 1
  return wrk.format("GET", "/api/public/v1/workflow-runs/" .. prefix .. "-" .. id)
end
response = function()
  if next_id >= start + count then
    wrk.thread:stop()
  end
end
