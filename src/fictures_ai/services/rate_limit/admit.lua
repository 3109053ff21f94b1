-- Atomic check-and-charge on one client's hash {w, p1..p3, c1..c3} (window index, previous and
-- current counters): the same arithmetic as window.py and in_memory.py, in integers.
-- KEYS[1]: the client's key. ARGV: now in ms (negative: use the Redis server's clock, which all
-- replicas share), window length in ms, limits x3 (0 = unlimited), needs x3, charges x3.
-- Returns {allowed, elapsed_ms, prev x3, curr x3}; the counters are after charging if allowed.
local now = tonumber(ARGV[1])
if now < 0 then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local size = tonumber(ARGV[2])
local window = math.floor(now / size)
local elapsed = now - window * size
local stored = redis.call('HMGET', KEYS[1], 'w', 'p1', 'p2', 'p3', 'c1', 'c2', 'c3')
local prev = {0, 0, 0}
local curr = {0, 0, 0}
local last = tonumber(stored[1])
if last ~= nil then
  if last >= window then
    window = last
    for i = 1, 3 do
      prev[i] = tonumber(stored[1 + i]) or 0
      curr[i] = tonumber(stored[4 + i]) or 0
    end
  elseif last == window - 1 then
    for i = 1, 3 do
      prev[i] = tonumber(stored[4 + i]) or 0
    end
  end
end
local allowed = 1
for i = 1, 3 do
  local limit = tonumber(ARGV[2 + i])
  local need = tonumber(ARGV[5 + i])
  if limit > 0 and need > 0
      and prev[i] * (size - elapsed) + (curr[i] + need) * size > limit * size then
    allowed = 0
  end
end
if allowed == 1 then
  local charged = false
  for i = 1, 3 do
    local charge = tonumber(ARGV[8 + i])
    if charge > 0 then
      curr[i] = curr[i] + charge
      charged = true
    end
  end
  if charged then
    redis.call('HSET', KEYS[1], 'w', window, 'p1', prev[1], 'p2', prev[2], 'p3', prev[3],
      'c1', curr[1], 'c2', curr[2], 'c3', curr[3])
    -- Gone once the current window's usage has faded out too.
    redis.call('PEXPIRE', KEYS[1], 2 * size - elapsed)
  end
end
return {allowed, elapsed, prev[1], prev[2], prev[3], curr[1], curr[2], curr[3]}
