-- Argo CD health of a MemUCluster (memu.dev/v1alpha1), from the status the memU operator writes:
--   Healthy      Ready=True and status.observedGeneration == metadata.generation
--   Progressing  no status yet, the current generation not yet observed, Reconciling=True,
--                or Ready not (yet) True
--   Degraded     Stalled=True: the operator cannot realise this spec (the condition's message says why)
--   Suspended    spec.paused: the operator leaves the children as they are
-- Argo CD runs it with the live object in the global `obj`; it returns a table {status, message}.
-- Embedded in argocd-cm by argocd-cm-health.yaml (keep the two identical; a test checks it).

local hs = {}

local function find_condition(status, kind)
  if type(status.conditions) ~= "table" then
    return nil
  end
  for _, c in ipairs(status.conditions) do
    if c.type == kind then
      return c
    end
  end
  return nil
end

local function describe(c, fallback)
  if c ~= nil and c.message ~= nil and c.message ~= "" then
    if c.reason ~= nil and c.reason ~= "" then
      return c.reason .. ": " .. c.message
    end
    return c.message
  end
  return fallback
end

if obj.spec ~= nil and obj.spec.paused == true then
  hs.status = "Suspended"
  hs.message = "spec.paused is true: the operator leaves the children as they are"
  return hs
end

local status = obj.status
if status == nil then
  hs.status = "Progressing"
  hs.message = "waiting for the operator to report a status"
  return hs
end

local generation = nil
if obj.metadata ~= nil then
  generation = obj.metadata.generation
end
local observed = status.observedGeneration
if generation ~= nil and observed ~= generation then
  hs.status = "Progressing"
  if observed == nil then
    hs.message = "generation " .. tostring(generation) .. " not yet observed by the operator"
  else
    hs.message = "generation " .. tostring(generation) .. " not yet observed (status is of generation " ..
      tostring(observed) .. ")"
  end
  return hs
end

local stalled = find_condition(status, "Stalled")
if stalled ~= nil and stalled.status == "True" then
  hs.status = "Degraded"
  hs.message = describe(stalled, "the operator cannot realise this spec")
  return hs
end

local ready = find_condition(status, "Ready")
if ready ~= nil and ready.status == "True" then
  hs.status = "Healthy"
  hs.message = describe(ready, "Ready")
  return hs
end

hs.status = "Progressing"
local reconciling = find_condition(status, "Reconciling")
if ready ~= nil then
  hs.message = describe(ready, "not Ready yet")
elseif reconciling ~= nil and reconciling.status == "True" then
  hs.message = describe(reconciling, "reconciling")
else
  hs.message = "waiting for the Ready condition"
end
local degraded = find_condition(status, "Degraded")
if degraded ~= nil and degraded.status == "True" and degraded.message ~= nil then
  hs.message = hs.message .. "; " .. degraded.message
end
return hs
