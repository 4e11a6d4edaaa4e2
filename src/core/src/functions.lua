#!lua name=pipeline_board
-- The projection's writer. Every event is applied by exactly one FCALL, atomically: either all
-- of its index changes happen or none. KEYS[1] is the org's key base `<prefix>:{<orgId>}`; every
-- key touched is built from it, so they all live in the org's hash slot (Redis Cluster).
--
-- Version rules (CONTRACT.md 2): an upsert or delete applies only when its version is greater
-- than the last applied one (deletes leave that version behind as a tombstone); messages are
-- idempotent by _id. Index names mirror src/core/src/keys.rs.

-- The one error that is the event's fault: its content cannot be applied. The projector
-- dead-letters an event only for this code; any other error (a killed script, a bug in a
-- deployed library, a cluster redirection) is retried, never costs the event.
local function invalid(what)
  error(redis.error_reply('PB_INVALID ' .. what))
end

-- A value inside a key (user, source): `%`, `:`, `|`, `{`, `}` and `-` become `%XX`, so that no
-- two different values give one key. keys::encode_component in Rust is the same function
-- (stage keys arrive encoded from Rust); `pb_key_component` exposes this one to a test.
local function enc(value)
  return (string.gsub(value, '[%%:|{}%-]', function(c) return string.format('%%%02X', string.byte(c)) end))
end

-- Versions are canonical decimal strings of 1 .. 2^63-1 and are compared as such, exactly: Lua
-- numbers are doubles, in which 2^53 + 1 equals 2^53. Written back as given.
local function version_gt(a, b)
  if #a ~= #b then return #a > #b end
  return a > b
end

local function newer(K, dockey, version)
  if type(version) ~= 'string' or #version > 19 or not string.match(version, '^[1-9]%d*$')
      or (#version == 19 and version > '9223372036854775807') then
    invalid('version ' .. tostring(version) .. ' is not an integer from 1 to 2^63-1')
  end
  local cur = redis.call('HGET', K .. ':ver', dockey)
  if cur and not version_gt(version, cur) then return false end
  redis.call('HSET', K .. ':ver', dockey, version)
  return true
end

local function load_meta(K, k, id)
  local raw = redis.call('HGET', K .. ':meta:' .. k, id)
  if raw then return cmsgpack.unpack(raw) end
  return nil
end

-- Assignee union and last message time of a contact: the derived part of its cards.
local function derived(K, cid)
  if not cid then return {}, nil end
  local asg = redis.call('SMEMBERS', K .. ':asgof:' .. cid)
  table.sort(asg)
  local last = redis.call('ZRANGE', K .. ':msgs:' .. cid, -1, -1, 'WITHSCORES')
  local lm = nil
  if #last > 0 then lm = tonumber(last[2]) end
  return asg, lm
end

-- Trigrams by UTF-8 character, as card::trigrams in Rust.
local function trigrams(txt, out)
  local chars = {}
  for ch in string.gmatch(txt, '[%z\1-\127\194-\244][\128-\191]*') do chars[#chars + 1] = ch end
  for i = 1, #chars - 2 do out[chars[i] .. chars[i + 1] .. chars[i + 2]] = true end
end

-- The index entries of a card: 'z|key' (scored by createdAt), 'l|key' (scored by last message
-- time). Derived purely from the stored meta, so the old entries of a card can always be
-- recomputed for removal. The search (trigram) sets are kept apart: they change only with the
-- card's text, while messages and conversations change the other entries all day.
local function entries(K, k, m)
  local out = {}
  if m.rk then
    local rk = k .. ':' .. m.rk
    out[#out + 1] = 'z|' .. K .. ':z:' .. rk
    local people = {}
    if m.cre then people[m.cre] = true end
    if m.own then people[m.own] = true end
    for _, u in ipairs(m.asg) do
      people[u] = true
      out[#out + 1] = 'z|' .. K .. ':za:' .. rk .. ':' .. enc(u)
    end
    for u in pairs(people) do out[#out + 1] = 'z|' .. K .. ':zp:' .. rk .. ':' .. enc(u) end
    if not m.own and #m.asg == 0 then out[#out + 1] = 'z|' .. K .. ':zu:' .. rk end
    if m.src then out[#out + 1] = 'z|' .. K .. ':zs:' .. rk .. ':' .. enc(m.src) end
    if m.bulk then out[#out + 1] = 'z|' .. K .. ':zb:' .. rk end
    if m.lm then
      out[#out + 1] = 'z|' .. K .. ':zm:' .. rk
      out[#out + 1] = 'l|' .. K .. ':zl:' .. rk
    else
      out[#out + 1] = 'z|' .. K .. ':zn:' .. rk
    end
  end
  return out
end

-- The search entries of a card; they depend on its text only.
local function search_entries(K, k, m)
  local grams, out = {}, {}
  for _, t in ipairs(m.txt) do trigrams(t, grams) end
  for g in pairs(grams) do out[#out + 1] = K .. ':tri:' .. k .. ':' .. g end
  return out
end

local function same_text(a, b)
  if #a ~= #b then return false end
  for i = 1, #a do
    if a[i] ~= b[i] then return false end
  end
  return true
end

local function score_of(m, kind)
  if kind == 'l' then return m.lm end
  if m.sc then return m.sc end
  return '-inf'
end

-- Moves a card from the entries of `oldm` to those of `newm` (either may be nil).
local function reindex(K, k, id, oldm, newm)
  local old, new = {}, {}
  if oldm then for _, e in ipairs(entries(K, k, oldm)) do old[e] = true end end
  if newm then for _, e in ipairs(entries(K, k, newm)) do new[e] = true end end
  for e in pairs(old) do
    if not new[e] then redis.call('ZREM', string.sub(e, 3), id) end
  end
  for e in pairs(new) do
    local kind, key = string.sub(e, 1, 1), string.sub(e, 3)
    if not old[e] or score_of(oldm, kind) ~= score_of(newm, kind) then
      redis.call('ZADD', key, score_of(newm, kind), id)
    end
  end
  -- Search sets: only when the text changed (or the card appears or goes).
  if oldm and newm and same_text(oldm.txt, newm.txt) then return end
  local old_s, new_s = {}, {}
  if oldm then for _, key in ipairs(search_entries(K, k, oldm)) do old_s[key] = true end end
  if newm then for _, key in ipairs(search_entries(K, k, newm)) do new_s[key] = true end end
  for key in pairs(old_s) do
    if not new_s[key] then redis.call('SREM', key, id) end
  end
  for key in pairs(new_s) do
    if not old_s[key] then redis.call('SADD', key, id) end
  end
end

-- Re-derives assignees and last message of every card that shows contact `cid`.
local function refresh_contact(K, cid)
  local asg, lm = derived(K, cid)
  local cards = { { 'c', cid } }
  for _, aid in ipairs(redis.call('SMEMBERS', K .. ':appsof:' .. cid)) do cards[#cards + 1] = { 'a', aid } end
  for _, card in ipairs(cards) do
    local k, id = card[1], card[2]
    local m = load_meta(K, k, id)
    if m then
      local newm = {}
      for f, v in pairs(m) do newm[f] = v end
      newm.asg, newm.lm = asg, lm
      reindex(K, k, id, m, newm)
      redis.call('HSET', K .. ':meta:' .. k, id, cmsgpack.pack(newm))
    end
  end
end

-- KEYS[1]=K ARGV: kind tag ('c'|'a'), id, version, core meta JSON, bincode body
local function upsert_card(keys, args)
  local K, k, id, version = keys[1], args[1], args[2], args[3]
  if not newer(K, k .. ':' .. id, version) then return 'stale' end
  local oldm = load_meta(K, k, id)
  local m = cjson.decode(args[4])
  if type(m.txt) ~= 'table' then m.txt = {} end
  if k == 'a' then
    if oldm and oldm.cid and oldm.cid ~= m.cid then redis.call('SREM', K .. ':appsof:' .. oldm.cid, id) end
    if m.cid then redis.call('SADD', K .. ':appsof:' .. m.cid, id) end
  end
  m.asg, m.lm = derived(K, m.cid)
  reindex(K, k, id, oldm, m)
  redis.call('HSET', K .. ':meta:' .. k, id, cmsgpack.pack(m))
  redis.call('HSET', K .. ':body:' .. k, id, args[5])
  return 'applied'
end

-- KEYS[1]=K ARGV: kind tag, id, version
local function delete_card(keys, args)
  local K, k, id, version = keys[1], args[1], args[2], args[3]
  if not newer(K, k .. ':' .. id, version) then return 'stale' end
  local oldm = load_meta(K, k, id)
  if oldm then
    reindex(K, k, id, oldm, nil)
    if k == 'a' and oldm.cid then redis.call('SREM', K .. ':appsof:' .. oldm.cid, id) end
  end
  redis.call('HDEL', K .. ':meta:' .. k, id)
  redis.call('HDEL', K .. ':body:' .. k, id)
  return 'applied'
end

local function rebuild_assignees(K, cid)
  local key = K .. ':asgof:' .. cid
  redis.call('DEL', key)
  for _, conv in ipairs(redis.call('SMEMBERS', K .. ':convsof:' .. cid)) do
    local raw = redis.call('HGET', K .. ':conv', conv)
    if raw then
      for _, u in ipairs(cmsgpack.unpack(raw).asg) do redis.call('SADD', key, u) end
    end
  end
end

-- KEYS[1]=K ARGV: conversation id, version, contact id ('' if none), assignees JSON array
local function upsert_conversation(keys, args)
  local K, id, version = keys[1], args[1], args[2]
  if not newer(K, 'v:' .. id, version) then return 'stale' end
  local cid = args[3]
  if cid == '' then cid = nil end
  local asg = cjson.decode(args[4])
  local raw = redis.call('HGET', K .. ':conv', id)
  local old_cid = nil
  if raw then old_cid = cmsgpack.unpack(raw).cid end
  redis.call('HSET', K .. ':conv', id, cmsgpack.pack({ cid = cid, asg = asg }))
  if old_cid and old_cid ~= cid then
    redis.call('SREM', K .. ':convsof:' .. old_cid, id)
    rebuild_assignees(K, old_cid)
    refresh_contact(K, old_cid)
  end
  if cid then
    redis.call('SADD', K .. ':convsof:' .. cid, id)
    rebuild_assignees(K, cid)
    refresh_contact(K, cid)
  end
  return 'applied'
end

-- KEYS[1]=K ARGV: message id, contact id, createdAt millis
local function create_message(keys, args)
  local K, id, cid, at = keys[1], args[1], args[2], tonumber(args[3])
  local key = K .. ':msgs:' .. cid
  local last = redis.call('ZRANGE', key, -1, -1, 'WITHSCORES')
  if redis.call('ZADD', key, 'NX', at, id) == 0 then return 'duplicate' end
  -- Only a new latest message changes what the cards show.
  if #last == 0 or at > tonumber(last[2]) then refresh_contact(K, cid) end
  return 'applied'
end

-- KEYS[1]=K ARGV: pipeline id, version, pipeline JSON
local function upsert_pipeline(keys, args)
  local K, id, version = keys[1], args[1], args[2]
  if not newer(K, 'p:' .. id, version) then return 'stale' end
  redis.call('HSET', K .. ':pipelines', id, args[3])
  return 'applied'
end

-- KEYS[1]=K ARGV: pipeline id, version
local function delete_pipeline(keys, args)
  local K, id, version = keys[1], args[1], args[2]
  if not newer(K, 'p:' .. id, version) then return 'stale' end
  redis.call('HDEL', K .. ':pipelines', id)
  return 'applied'
end

-- KEYS[1]=K ARGV: user id, version, team ids JSON array
local function upsert_user(keys, args)
  local K, id, version = keys[1], args[1], args[2]
  if not newer(K, 'u:' .. id, version) then return 'stale' end
  local raw = redis.call('HGET', K .. ':users', id)
  if raw then
    for _, t in ipairs(cjson.decode(raw)) do redis.call('SREM', K .. ':team:' .. t, id) end
  end
  for _, t in ipairs(cjson.decode(args[3])) do redis.call('SADD', K .. ':team:' .. t, id) end
  redis.call('HSET', K .. ':users', id, args[3])
  return 'applied'
end

redis.register_function('pb_upsert_card', upsert_card)
redis.register_function('pb_delete_card', delete_card)
redis.register_function('pb_upsert_conversation', upsert_conversation)
redis.register_function('pb_create_message', create_message)
redis.register_function('pb_upsert_pipeline', upsert_pipeline)
redis.register_function('pb_delete_pipeline', delete_pipeline)
redis.register_function('pb_upsert_user', upsert_user)

-- ---------------------------------------------------------------------------------------------
-- Reads. pb_board answers a whole board in one call (no writes: it may run on replicas through
-- FCALL_RO). ARGV[1] is the plan JSON built by src/query/projection.rs: the raw stage keys of each
-- bucket, its page, and the filters. Per raw stage key it reads the smallest index that already
-- answers a filter ("the driver"); with one driver key and no further filter the page is one
-- ZRANGE BYSCORE REV LIMIT and the exact total one ZCOUNT. Other filters are checked per candidate
-- of the driver (ZSCORE in the other indexes). A search term of 3+ characters drives from the
-- trigram index instead and is verified literally.

local function tonum(s)
  if s == '-inf' then return -math.huge end
  if s == 'inf' or s == '+inf' then return math.huge end
  return tonumber(s)
end

local function board(keys, args)
  local K = keys[1]
  local p = cjson.decode(args[1])
  local k = p.k
  local term = p.term

  local function card_meta(id)
    local raw = redis.call('HGET', K .. ':meta:' .. k, id)
    if raw then return cmsgpack.unpack(raw) end
    return nil
  end

  local function matches_term(m)
    for _, t in ipairs(m.txt) do
      if string.find(t, term, 1, true) then return true end
    end
    return false
  end

  -- ownerFilter "team": the members of the caller's teams, from the projection's own users.
  local people = p.people
  if p.team_of then
    people = {}
    local raw = redis.call('HGET', K .. ':users', p.team_of)
    if raw then
      local seen = {}
      for _, t in ipairs(cjson.decode(raw)) do
        for _, u in ipairs(redis.call('SMEMBERS', K .. ':team:' .. t)) do
          if not seen[u] then
            seen[u] = true
            people[#people + 1] = u
          end
        end
      end
    end
  end

  -- Each constraint is a list of index keys whose union holds the cards that pass it.
  local function constraints(pre)
    local cons = {}
    if people then
      local l = {}
      for _, u in ipairs(people) do l[#l + 1] = K .. ':zp:' .. pre .. ':' .. enc(u) end
      cons[#cons + 1] = l
    end
    if p.assignees then
      local l = {}
      for _, u in ipairs(p.assignees) do l[#l + 1] = K .. ':za:' .. pre .. ':' .. enc(u) end
      cons[#cons + 1] = l
    end
    if p.unassigned then cons[#cons + 1] = { K .. ':zu:' .. pre } end
    if p.source then cons[#cons + 1] = { K .. ':zs:' .. pre .. ':' .. enc(p.source) } end
    if p.bulk then cons[#cons + 1] = { K .. ':zb:' .. pre } end
    if p.answered == 'yes' then cons[#cons + 1] = { K .. ':zm:' .. pre } end
    if p.answered == 'no' then cons[#cons + 1] = { K .. ':zn:' .. pre } end
    return cons
  end

  local function in_any(list, id)
    for _, key in ipairs(list) do
      if redis.call('ZSCORE', key, id) then return true end
    end
    return false
  end

  local function in_all(cons, id)
    for _, con in ipairs(cons) do
      if not in_any(con, id) then return false end
    end
    return true
  end

  -- Filters no index answers directly: last-message windows and a short search term.
  local function passes(id, pre, m, check_term)
    if p.quiet_before then
      local lm = redis.call('ZSCORE', K .. ':zl:' .. pre, id)
      if lm and tonumber(lm) >= p.quiet_before then return false end
    end
    if p.msg_min then
      m = m or card_meta(id)
      if not m or not m.cid then return false end
      if redis.call('ZCOUNT', K .. ':msgs:' .. m.cid, p.msg_min, p.msg_max) == 0 then return false end
    end
    if check_term then
      m = m or card_meta(id)
      if not m or not matches_term(m) then return false end
    end
    return true
  end

  -- Search with trigrams: the candidates of the whole board, once, grouped by raw stage key.
  local by_rk = nil
  if p.grams then
    by_rk = {}
    local gk = {}
    for _, g in ipairs(p.grams) do gk[#gk + 1] = K .. ':tri:' .. k .. ':' .. g end
    for _, id in ipairs(redis.call('SINTER', unpack(gk))) do
      local m = card_meta(id)
      if m and m.rk and matches_term(m) then
        local l = by_rk[m.rk]
        if not l then
          l = {}
          by_rk[m.rk] = l
        end
        l[#l + 1] = { id, m }
      end
    end
  end

  -- Merges lists already ordered by (score desc, id desc) into the first `need` entries.
  -- Inline comparisons: a Lua comparator for table.sort costs ~2 us a call on PUC Lua.
  local function merge(lists, need)
    local ids, pos = {}, {}
    for i = 1, #lists do pos[i] = 1 end
    while #ids < need do
      local best = nil
      for i, l in ipairs(lists) do
        local j = pos[i]
        if j <= #l.ids then
          if not best then
            best = i
          else
            local bl, bj = lists[best], pos[best]
            local s, bs = l.scores[j], bl.scores[bj]
            if s > bs or (s == bs and l.ids[j] > bl.ids[bj]) then best = i end
          end
        end
      end
      if not best then break end
      ids[#ids + 1] = lists[best].ids[pos[best]]
      pos[best] = pos[best] + 1
    end
    return ids
  end

  local function fetch_ordered(key, need)
    local r = redis.call('ZRANGE', key, p.cmax, p.cmin, 'BYSCORE', 'REV', 'LIMIT', 0, need, 'WITHSCORES')
    local l = { ids = {}, scores = {} }
    for i = 1, #r, 2 do
      l.ids[#l.ids + 1] = r[i]
      l.scores[#l.scores + 1] = tonum(r[i + 1])
    end
    return l
  end

  local out = {}
  for _, b in ipairs(p.buckets) do
    local total = 0
    local need = b.offset + b.limit
    local ordered = {}   -- index keys whose range is a part of the bucket as it is: {key, count}
    local loose = {}     -- candidates that passed per-card checks: { {score, id}, ... }
    local materialized = {} -- lists already read in board order: { ids = {...}, scores = {...} }
    for _, rk in ipairs(b.rks) do
      local pre = k .. ':' .. rk
      local cons = constraints(pre)
      if by_rk then
        for _, c in ipairs(by_rk[rk] or {}) do
          local id, m = c[1], c[2]
          local ok = true
          if p.created then
            ok = m.sc ~= nil and (p.cstart == nil or m.sc >= p.cstart) and (p.cend == nil or m.sc <= p.cend)
          end
          if ok and in_all(cons, id) and passes(id, pre, m, false) then
            total = total + 1
            loose[#loose + 1] = { m.sc or -math.huge, id }
          end
        end
      else
        local driver, di = { K .. ':z:' .. pre }, 0
        local best = nil
        for i, con in ipairs(cons) do
          local n = 0
          for _, key in ipairs(con) do n = n + redis.call('ZCOUNT', key, p.cmin, p.cmax) end
          if not best or n < best then best, driver, di = n, con, i end
        end
        local checks = {}
        for i, con in ipairs(cons) do
          if i ~= di then checks[#checks + 1] = con end
        end
        local per_card = p.quiet_before or p.msg_min or term
        local single = #driver == 1
        for _, con in ipairs(checks) do
          if #con ~= 1 then single = false end
        end
        if single and #checks == 0 and not per_card then
          local n = redis.call('ZCOUNT', driver[1], p.cmin, p.cmax)
          total = total + n
          if n > 0 then ordered[#ordered + 1] = { driver[1], n } end
        elseif single and not per_card then
          -- Every filter is one index: intersect them in C. All these sets score a card by its
          -- createdAt, so MAX keeps that score; ascending order read backwards is board order.
          -- (Measured here: 3x faster than testing each candidate with ZSCORE from Lua, and
          -- faster than ZINTERCARD plus a chunked ZMSCORE walk.)
          local args = { 1 + #checks, driver[1] }
          for _, con in ipairs(checks) do args[#args + 1] = con[1] end
          args[#args + 1] = 'AGGREGATE'
          args[#args + 1] = 'MAX'
          args[#args + 1] = 'WITHSCORES'
          local r = redis.call('ZINTER', unpack(args))
          local l = { ids = {}, scores = {} }
          for i = #r - 1, 1, -2 do
            local sc = tonum(r[i + 1])
            local inside = true
            if p.created then
              inside = sc ~= -math.huge and (p.cstart == nil or sc >= p.cstart) and (p.cend == nil or sc <= p.cend)
            end
            if inside then
              l.ids[#l.ids + 1] = r[i]
              l.scores[#l.scores + 1] = sc
            end
          end
          total = total + #l.ids
          if #l.ids > 0 then materialized[#materialized + 1] = l end
        else
          local seen = {}
          for _, key in ipairs(driver) do
            local r = redis.call('ZRANGE', key, p.cmin, p.cmax, 'BYSCORE', 'WITHSCORES')
            for i = 1, #r, 2 do
              local id = r[i]
              if not seen[id] then
                seen[id] = true
                if in_all(checks, id) and passes(id, pre, nil, term ~= nil) then
                  total = total + 1
                  loose[#loose + 1] = { tonum(r[i + 1]), id }
                end
              end
            end
          end
        end
      end
    end
    local ids = {}
    if b.limit > 0 and b.offset < total then
      if #ordered == 1 and #loose == 0 and #materialized == 0 then
        -- One index holds the whole bucket: the page is one range read, no scores needed.
        ids = redis.call('ZRANGE', ordered[1][1], p.cmax, p.cmin, 'BYSCORE', 'REV', 'LIMIT', b.offset, b.limit)
      else
        local lists = {}
        for _, o in ipairs(ordered) do lists[#lists + 1] = fetch_ordered(o[1], need) end
        for _, l in ipairs(materialized) do lists[#lists + 1] = l end
        if #loose > 0 then
          table.sort(loose, function(x, y)
            if x[1] ~= y[1] then return x[1] > y[1] end
            return x[2] > y[2]
          end)
          local l = { ids = {}, scores = {} }
          for i = 1, math.min(#loose, need) do
            l.ids[i] = loose[i][2]
            l.scores[i] = loose[i][1]
          end
          lists[#lists + 1] = l
        end
        local merged = merge(lists, need)
        for i = b.offset + 1, #merged do ids[#ids + 1] = merged[i] end
      end
    end
    -- The page: id, bincode body and msgpack meta (assignees and last message time are
    -- decoded by the caller, off Redis' thread), fetched with one HMGET per hash.
    local page = { total }
    if #ids > 0 then
      local bodies = redis.call('HMGET', K .. ':body:' .. k, unpack(ids))
      local metas = redis.call('HMGET', K .. ':meta:' .. k, unpack(ids))
      for i, id in ipairs(ids) do
        page[#page + 1] = id
        page[#page + 1] = bodies[i]
        page[#page + 1] = metas[i]
      end
    end
    out[#out + 1] = page
  end
  return out
end

redis.register_function{ function_name = 'pb_board', callback = board, flags = { 'no-writes' } }
redis.register_function{ function_name = 'pb_key_component', callback = function(_, args) return enc(args[1]) end, flags = { 'no-writes' } }
