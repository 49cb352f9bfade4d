-- wrk: GET a run id PREFIX-i with i in 0..RUN_COUNT-1, skewed toward low ids (a hot set).
local prefix = os.getenv("RUN_PREFIX") or "done"
local n = tonumber(os.getenv("RUN_COUNT") or "1000")
local headers = {}
local auth = os.getenv("RUN_AUTH") or ""
if auth ~= "" then headers["Authorization"] = auth end
math.randomseed(os.time())
request = function()
  local r = math.random()
  local i = math.floor(n * r * r * r)
  return wrk.format("GET", "/api/public/v1/workflow-runs/" .. prefix .. "-" .. i, headers)
end
