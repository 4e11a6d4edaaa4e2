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
