#!lua name=pipeline_board
-- The projection's one writer Function: commits the writes the projector computed in Rust for
-- one org and one Kafka batch, atomically, if what the projector read is still what Redis holds.
-- Every rule (versions, buckets, derived fields) lives in Rust (src/core/src/record.rs and
-- consumers/src/batch.rs); this only compares and writes.
--
-- KEYS[1]: the org's key base `<prefix>:{<orgId>}`. Every key written is KEYS[1] .. suffix, so all
-- of them live in the org's hash slot (Redis Cluster).
-- ARGV[1]: number of guards; then per guard: hash suffix, field, expected value ('0' = the field
-- must be absent, '1' .. value = it must hold value).
-- Then the writes, each an op code and its arguments:
--   H suffix field value | h suffix field            HSET | HDEL
--   Z suffix score member | z suffix member          ZADD | ZREM
--   S suffix member | s suffix member                SADD | SREM
--   X suffix maxlen field value                      XADD suffix MAXLEN ~ maxlen * field value
-- Reply: 'ok', or 'conflict' (nothing written: another projector changed a guarded field since
-- it was read; the caller reads again and recomputes).
local function commit(keys, args)
  local K = keys[1]
  local guards = tonumber(args[1])
  local i = 2
  for _ = 1, guards do
    local cur = redis.call('HGET', K .. args[i], args[i + 1])
    local want = args[i + 2]
    if want == '0' then
      if cur then return 'conflict' end
    elseif cur ~= string.sub(want, 2) then
      return 'conflict'
    end
    i = i + 3
  end
  -- Check every op before the first write: Redis keeps the writes of a script that fails midway.
  local arity = { H = 4, h = 3, Z = 4, z = 3, S = 3, s = 3, X = 5 }
  local n, j = #args, i
  while j <= n do
    local a = arity[args[j]]
    if not a or j + a - 1 > n then return redis.error_reply('PB_BAD_OP ' .. tostring(args[j]) .. ' at ' .. j) end
    j = j + a
  end
  while i <= n do
    local op, key = args[i], K .. args[i + 1]
    if op == 'H' then
      redis.call('HSET', key, args[i + 2], args[i + 3])
    elseif op == 'h' then
      redis.call('HDEL', key, args[i + 2])
    elseif op == 'Z' then
      redis.call('ZADD', key, args[i + 2], args[i + 3])
    elseif op == 'z' then
      redis.call('ZREM', key, args[i + 2])
    elseif op == 'S' then
      redis.call('SADD', key, args[i + 2])
    elseif op == 's' then
      redis.call('SREM', key, args[i + 2])
    else
      redis.call('XADD', key, 'MAXLEN', '~', args[i + 2], '*', args[i + 3], args[i + 4])
    end
    i = i + arity[op]
  end
  return 'ok'
end

redis.register_function('pb_commit', commit)

-- A page deep inside the union of a bucket's raw stage sets (read-only, no state): the ids of
-- ranks [offset, offset + limit) in board order (score descending, then id descending), in work
-- proportional to the page, not to the offset. Binary search finds the score of the first card
-- of the page with ZCOUNTs (O(log n) each), then only that score's ties and the page are read.
-- KEYS: the sets (one slot: the org's). ARGV: offset, limit, min, max (ZCOUNT syntax bounds of a
-- created range; '-inf' '+inf' when none).
local function union_page(keys, args)
  local offset, limit, min, max = tonumber(args[1]), tonumber(args[2]), args[3], args[4]
  local function count_from(s) -- cards with score >= s (s a number or '-inf') within [min, max]
    local n = 0
    for _, k in ipairs(keys) do n = n + redis.call('ZCOUNT', k, s, max) end
    return n
  end
  local function num(s) if s == '-inf' then return -math.huge end if s == '+inf' or s == 'inf' then return math.huge end return tonumber(s) end
  if count_from(min) <= offset then return {} end
  local function fmt(n) return string.format('%.0f', n) end
  -- Cards without createdAt score -inf and sort last; `finite` excludes them.
  local finite = min
  if min == '-inf' then finite = '(-inf' end
  -- The lowest and highest finite scores in range bound the search.
  local lo, hi = nil, nil
  for _, k in ipairs(keys) do
    local top = redis.call('ZRANGE', k, max, finite, 'BYSCORE', 'REV', 'LIMIT', 0, 1, 'WITHSCORES')
    local bottom = redis.call('ZRANGE', k, finite, max, 'BYSCORE', 'LIMIT', 0, 1, 'WITHSCORES')
    if #top > 0 then
      local t, b = num(top[2]), num(bottom[2])
      if not hi or t > hi then hi = t end
      if not lo or b < lo then lo = b end
    end
  end
  -- s*: the largest score with count_from(s*) > offset (the first card of the page has it).
  local star, above
  if not hi or count_from(finite) <= offset then
    star, above = '-inf', (hi and count_from(finite)) or 0
  else
    local a, b = lo, hi -- invariant: count_from(a) > offset
    while a < b do
      local m = math.floor((a + b + 1) / 2)
      if count_from(fmt(m)) > offset then a = m else b = m - 1 end
    end
    star, above = fmt(a), 0
    for _, k in ipairs(keys) do above = above + redis.call('ZCOUNT', k, '(' .. star, max) end
  end
  local skip = offset - above
  -- Ties at s* in id-descending order, then the cards below s*, merged across the sets.
  local ties, below = {}, {}
  for _, k in ipairs(keys) do
    for _, id in ipairs(redis.call('ZRANGE', k, star, star, 'BYSCORE', 'REV', 'LIMIT', 0, skip + limit)) do ties[#ties + 1] = id end
    if star ~= '-inf' then
      local r = redis.call('ZRANGE', k, '(' .. star, min, 'BYSCORE', 'REV', 'LIMIT', 0, limit, 'WITHSCORES')
      for i = 1, #r, 2 do below[#below + 1] = { num(r[i + 1]), r[i] } end
    end
  end
  table.sort(ties, function(x, y) return x > y end)
  table.sort(below, function(x, y) if x[1] ~= y[1] then return x[1] > y[1] end return x[2] > y[2] end)
  local out = {}
  for i = skip + 1, #ties do
    if #out == limit then return out end
    out[#out + 1] = ties[i]
  end
  for _, e in ipairs(below) do
    if #out == limit then break end
    out[#out + 1] = e[2]
  end
  return out
end

redis.register_function{ function_name = 'pb_union_page', callback = union_page, flags = { 'no-writes' } }
