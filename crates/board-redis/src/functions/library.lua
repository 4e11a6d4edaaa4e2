#!lua name=pipeline_board
-- Every server-side script of pipeline-board, as one library of Functions (one Rust module per
-- Function: crates/board-redis/src/functions/). First the projection's writer, pb_commit: it
-- commits the writes the projector computed in Rust for one org and one Kafka batch,
-- atomically, if what the projector read is still what Redis holds.
-- Every rule (versions, buckets, derived fields) lives in Rust (crates/board-model/src/record.rs and
-- consumers/src/batch.rs); this only compares and writes.
--
-- KEYS[1]: the org's key base `<prefix>[:<generation>]:{<orgId>}`. Every key touched is KEYS[1] ..
-- suffix, so all of them live in the org's hash slot (Redis Cluster).
-- KEYS[2] (the live projector's commits): the org's generation pointer. ARGV[1] is then the
-- generation the projector wrote for ('' = base, pointer absent); if the pointer says another,
-- nothing is written and the reply is 'moved:<generation>' (a rebuild switched the org).
-- ARGV (after that): a sequence of groups, each an op code, a key suffix, a count n and n items:
--   G suffix n (field expected)*n   guards: each field must hold `expected` ('' = absent: no
--                                   stored value is empty); checked before any write
--   H suffix n (field value)*n      HSET          h suffix n field*n         HDEL
--   Z suffix n (score member)*n     ZADD          z suffix n member*n        ZREM
--   S suffix n member*n             SADD          s suffix n member*n        SREM
--   X suffix n (maxlen field value) XADD suffix MAXLEN ~ maxlen * field value (n = 1)
--   O suffix n (field offset)*n     HSET each field unless it already holds a larger offset
--   W suffix 1 minimum              guard: the write counter (`:writes`) must be >= minimum, else
--                                   nothing is written and the reply is 'rewound:<held>'
-- One group is one command (in chunks of 500 items: Lua's unpack has a stack limit), so a batch
-- of a thousand cards is a few hundred calls, not thousands.
-- Reply: 'ok:<n>' (n: the org's write counter after this commit, `<base>:writes`), or 'conflict'
-- (nothing written: another projector changed a guarded field since it was read; the caller
-- reads again and recomputes).
local width = { G = 2, W = 1, H = 2, h = 1, Z = 2, z = 1, S = 1, s = 1, X = 3, O = 2 }
local command = { H = 'HSET', h = 'HDEL', Z = 'ZADD', z = 'ZREM', S = 'SADD', s = 'SREM' }
local CHUNK = 500

-- Raises each field of hash `key` to the offset beside it in args[from .. last] (field offset
-- pairs); never lowers one: offsets of progress only move forward (pb_commit's 'O' groups, the
-- floors of pb_state_start and pb_state_rewind).
local function raise_to(key, args, from, last)
  for j = from, last, 2 do
    local had = redis.call('HGET', key, args[j])
    if not had or tonumber(had) < tonumber(args[j + 1]) then redis.call('HSET', key, args[j], args[j + 1]) end
  end
end

local function commit(keys, args)
  local K = keys[1]
  local i, n = 1, #args
  if keys[2] then
    local current = redis.call('GET', keys[2]) or ''
    if current ~= args[1] then return 'moved:' .. current end
    i = 2
  end
  -- Check the shape of every group before the first write: Redis keeps the writes of a script
  -- that fails midway.
  local groups = {}
  while i <= n do
    local op, count = args[i], tonumber(args[i + 2])
    local w = width[op]
    if not w or not count or i + 2 + count * w > n then
      return redis.error_reply('PB_BAD_OP ' .. tostring(op) .. ' at ' .. i)
    end
    groups[#groups + 1] = { op, K .. args[i + 1], i + 3, count * w }
    i = i + 3 + count * w
  end
  for _, g in ipairs(groups) do
    local op, key, from, len = g[1], g[2], g[3], g[4]
    if op == 'W' then
      -- The org's write counter must be at least what the committer last saw: below it, these
      -- keys went back in time (an older RDB/AOF, a replica promoted behind) and writing on top
      -- would move the org's applied offsets past events they no longer hold.
      local held = tonumber(redis.call('GET', key) or '0')
      if held < tonumber(args[from]) then return 'rewound:' .. held end
    elseif op == 'G' then
      local fields = {}
      for j = from, from + len - 1, 2 do fields[#fields + 1] = args[j] end
      for c = 1, #fields, CHUNK do
        local cur = redis.call('HMGET', key, unpack(fields, c, math.min(c + CHUNK - 1, #fields)))
        for x = 1, #cur do
          local want = args[from + 2 * (c + x - 2) + 1]
          if want == '' then
            if cur[x] then return 'conflict' end
          elseif cur[x] ~= want then
            return 'conflict'
          end
        end
      end
    end
  end
  for _, g in ipairs(groups) do
    local op, key, from, len = g[1], g[2], g[3], g[4]
    if op == 'X' then
      redis.call('XADD', key, 'MAXLEN', '~', args[from], '*', args[from + 1], args[from + 2])
    elseif op == 'O' then
      raise_to(key, args, from, from + len - 1)
    elseif op ~= 'G' and op ~= 'W' then
      local step = width[op] * CHUNK
      for c = from, from + len - 1, step do
        redis.call(command[op], key, unpack(args, c, math.min(c + step - 1, from + len - 1)))
      end
    end
  end
  -- The org's write counter, raised with every commit: a Redis that went back in time (an older
  -- RDB or AOF loaded, a replica promoted while behind) hands a committer a number it already saw.
  return 'ok:' .. redis.call('INCR', K .. ':writes')
end

redis.register_function('pb_commit', commit)

-- Moves an org to another generation, atomically, if that generation holds every event of the
-- org that the current one holds: for each partition in the current generation's offsets, the
-- new one's offset must be at least as large. Both generations and the pointer are in the org's
-- slot. KEYS: pointer, new generation's offsets, current generation's offsets.
-- ARGV: new generation ('' = base), expected current generation ('' = base).
-- Reply: 'ok', 'moved:<generation>' (the pointer is not what the caller expected), or
-- 'behind:<topic/partition>' (nothing changed: replay further and call again).
local function switch(keys, args)
  local current = redis.call('GET', keys[1]) or ''
  if current ~= args[2] then return 'moved:' .. current end
  local have = redis.call('HGETALL', keys[3])
  for j = 1, #have, 2 do
    local new = redis.call('HGET', keys[2], have[j])
    if not new or tonumber(new) < tonumber(have[j + 1]) then return 'behind:' .. have[j] end
  end
  if args[1] == '' then redis.call('DEL', keys[1]) else redis.call('SET', keys[1], args[1]) end
  return 'ok'
end

redis.register_function('pb_switch', switch)

-- A stream id `ms-seq` as two numbers (milliseconds fit a double exactly).
local function stream_pos(id)
  local ms, seq = string.match(id or '', '^(%d+)-(%d+)$')
  return tonumber(ms or 0), tonumber(seq or 0)
end

-- Stores an org's index image (board-api query/index/image.rs) if the org still reads the
-- generation it was built from (an image stored after a rebuild's switch would outlive the
-- removal of its generation's keys) and no image of the same layout and the same or a later
-- change-stream position is stored (one of another layout, which this build cannot read, is
-- replaced). So an image's bytes never change under the same 'at' and 'layout': a reader that
-- finds both unchanged beside every part it reads has read one image. The image comes in parts,
-- stored as fields '0', '1', ... beside 'at', 'layout', 'parts' (how many) and 'bytes' (their
-- total), all replaced at once.
-- KEYS: the org's generation pointer, the image hash. ARGV: generation ('' = base), the stream
-- id the image is current to, its layout, then the parts (at most a few hundred: board-api's
-- MAX_IMAGE_BYTES in parts of IMAGE_PART_BYTES, well within unpack's limit). Reply: 'ok',
-- 'moved' (the org reads another generation now) or 'older' (an image of this layout as recent
-- or later is stored).
local function image_put(keys, args)
  if (redis.call('GET', keys[1]) or '') ~= args[1] then return 'moved' end
  local held = redis.call('HMGET', keys[2], 'at', 'layout')
  if held[1] and held[2] == args[3] then
    local hm, hs = stream_pos(held[1])
    local nm, ns = stream_pos(args[2])
    if hm > nm or (hm == nm and hs >= ns) then return 'older' end
  end
  local fields, bytes = {}, 0
  for i = 4, #args do
    fields[#fields + 1] = tostring(i - 4)
    fields[#fields + 1] = args[i]
    bytes = bytes + #args[i]
  end
  redis.call('DEL', keys[2])
  redis.call('HSET', keys[2], 'at', args[2], 'layout', args[3], 'parts', tostring(#args - 3), 'bytes', tostring(bytes), unpack(fields))
  return 'ok'
end

redis.register_function('pb_image_put_parts', image_put)

-- The whole-image Function of builds before parts: kept so that an instance of such a build,
-- during a rolling deploy, finds it and stores nothing (it would otherwise load its own library
-- over this one, and its 'image' field would sit beside the parts under their 'at').
redis.register_function('pb_image_put', function() return 'older' end)

-- Records consumer progress only while the projection it belongs to is still the one Redis
-- holds: KEYS: the state hash, the progress hash; ARGV: instance, then (field offset)*n.
-- Reply: 'ok', or 'lost' (Redis lost or replaced the projection: nothing written, the caller
-- starts again from what Redis holds).
local function progress(keys, args)
  if redis.call('HGET', keys[1], 'instance') ~= args[1] then return 'lost' end
  if #args > 1 then redis.call('HSET', keys[2], unpack(args, 2)) end
  return 'ok'
end

redis.register_function('pb_progress', progress)

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

-- The projection's state in {meta} (crates/board-redis/src/functions/state.rs). A counted list
-- is n, then (field value)*n; the last list of a call runs to the end of ARGV.

-- Makes a new `building` projection unless one exists (a first start, or a loss: FLUSHALL, a
-- Redis restarted without its data). KEYS: state, target, model marker, marks seen, progress.
-- ARGV: instance, now, incomplete ('' = none), model version, floors (counted), ends (to the
-- end). Reply: the instance Redis holds (the caller's when this call made it).
local function state_start(keys, args)
  if redis.call('HSETNX', keys[1], 'instance', args[1]) == 0 then return redis.call('HGET', keys[1], 'instance') end
  redis.call('HSET', keys[1], 'status', 'building', 'since', args[2])
  if args[3] ~= '' then redis.call('HSET', keys[1], 'incomplete', args[3]) end
  -- The model marker with the state: a later projector start finds the projection claimed. The
  -- marks seen belong to the projection that was lost: they start over.
  redis.call('SET', keys[3], args[4])
  redis.call('DEL', keys[4])
  local m = tonumber(args[5])
  raise_to(keys[5], args, 6, 5 + 2 * m)
  redis.call('DEL', keys[2])
  if #args > 5 + 2 * m then redis.call('HSET', keys[2], unpack(args, 6 + 2 * m)) end
  return args[1]
end

redis.register_function('pb_state_start', state_start)

-- Marks the projection whole if it is still `instance`. KEYS: state. ARGV: instance, now.
-- Reply: 1, or 0 (another instance: nothing written).
local function state_whole(keys, args)
  if redis.call('HGET', keys[1], 'instance') ~= args[1] then return 0 end
  redis.call('HSET', keys[1], 'status', 'whole', 'wholeAt', args[2])
  return 1
end

redis.register_function('pb_state_whole', state_whole)

-- After Redis went back in time: if the projection is still `mine`, lowers the progress to
-- `resume` (a field absent from it is deleted: that partition restarts from its beginning),
-- raises it to the floors, and makes `new` a `building` instance with the ends as its target.
-- KEYS: state, target, progress. ARGV: mine, new, now, incomplete ('' = none), resume
-- (counted), floors (counted), ends (to the end). Reply: 1, or 0 (nothing written).
local function state_rewind(keys, args)
  if redis.call('HGET', keys[1], 'instance') ~= args[1] then return 0 end
  local n = tonumber(args[5])
  local resume = {}
  for i = 6, 5 + 2 * n, 2 do resume[args[i]] = tonumber(args[i + 1]) end
  local held = redis.call('HGETALL', keys[3])
  for i = 1, #held, 2 do
    local to = resume[held[i]]
    if not to then redis.call('HDEL', keys[3], held[i])
    elseif to < tonumber(held[i + 1]) then redis.call('HSET', keys[3], held[i], to) end
  end
  local floors_at = 6 + 2 * n
  local m = tonumber(args[floors_at])
  raise_to(keys[3], args, floors_at + 1, floors_at + 2 * m)
  redis.call('HSET', keys[1], 'instance', args[2], 'status', 'building', 'since', args[3])
  redis.call('HDEL', keys[1], 'wholeAt')
  if args[4] ~= '' then redis.call('HSET', keys[1], 'incomplete', args[4]) end
  redis.call('DEL', keys[2])
  if #args > floors_at + 2 * m then redis.call('HSET', keys[2], unpack(args, floors_at + 2 * m + 1)) end
  return 1
end

redis.register_function('pb_state_rewind', state_rewind)

-- A primary's write mark (consumers/src/rewind.rs): raised past the highest seq the caller saw,
-- with the progress to keep beside it. KEYS: the mark. ARGV: seen, progress (JSON).
-- Reply: {'ok', new seq, ''}, or {'rewound', held seq, progress kept with it or ''} (the mark
-- holds less than was seen: this shard went back in time; nothing written).
local function mark_raise(keys, args)
  local seq = tonumber(redis.call('HGET', keys[1], 'seq') or '0')
  if seq < tonumber(args[1]) then
    return { 'rewound', seq, redis.call('HGET', keys[1], 'progress') or '' }
  end
  seq = seq + 1
  redis.call('HSET', keys[1], 'seq', seq, 'progress', args[2])
  return { 'ok', seq, '' }
end

redis.register_function('pb_mark_raise', mark_raise)

-- The rebuild's lease: renewed and released only by its holder. KEYS: the lease.
-- pb_lease_renew ARGV: holder, ttl ms. pb_lease_release ARGV: holder. Reply: 1, or 0 (another
-- holder, or none: nothing changed).
local function lease_renew(keys, args)
  if redis.call('GET', keys[1]) ~= args[1] then return 0 end
  return redis.call('PEXPIRE', keys[1], args[2])
end

local function lease_release(keys, args)
  if redis.call('GET', keys[1]) ~= args[1] then return 0 end
  return redis.call('DEL', keys[1])
end

-- PEXPIRE and DEL free memory or add none: like the scripts they replace, they run when Redis
-- is out of memory (a Function without flags is refused then).
redis.register_function{ function_name = 'pb_lease_renew', callback = lease_renew, flags = { 'allow-oom' } }
redis.register_function{ function_name = 'pb_lease_release', callback = lease_release, flags = { 'allow-oom' } }
