-- Argo CD health check for kubetune.io/FineTuneJob.
-- Argo CD runs this with gopher-lua (Lua 5.1): no integer division, no goto, no utf8.
--
--   status.observedGeneration < metadata.generation  -> Progressing (the operator has not
--                                                      acted on the latest spec yet)
--   condition Validated=False, phase Failed           -> Degraded
--   phase Succeeded, condition GatesPassed=False      -> Degraded (trained, but the model
--                                                      misses its quality gates)
--   phase Succeeded, condition Promoted=False with     -> Degraded (trained and gated, but
--   reason PromotionFailed                              the registry step or the promote
--                                                      Job failed)
--   phase Succeeded                                   -> Healthy
--   phase Suspended or spec.suspend                    -> Suspended
--   phase Pending / Running / no status yet            -> Progressing (with step/percent)

local hs = {}

local function condition(status, ctype)
  if status == nil or status.conditions == nil then
    return nil
  end
  for _, c in ipairs(status.conditions) do
    if c.type == ctype then
      return c
    end
  end
  return nil
end

local function message_of(status, ctype, fallback)
  local c = condition(status, ctype)
  if c ~= nil and c.message ~= nil and c.message ~= "" then
    return c.message
  end
  if status ~= nil and status.message ~= nil and status.message ~= "" then
    return status.message
  end
  return fallback
end

local function progress_text(status)
  local p = status.progress
  if p == nil or p.step == nil then
    return nil
  end
  local text = "step " .. string.format("%d", p.step)
  if p.totalSteps ~= nil and p.totalSteps > 0 then
    text = text .. "/" .. string.format("%d", p.totalSteps)
    text = text .. string.format(" (%d%%)", math.floor(100 * p.step / p.totalSteps))
  end
  if p.loss ~= nil then
    text = text .. string.format(", loss %.4g", p.loss)
  end
  if p.etaSeconds ~= nil then
    text = text .. string.format(", ETA %ds", p.etaSeconds)
  end
  return text
end

local status = obj.status
if status == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for the kubetune operator to pick up the job"
  return hs
end

local generation = obj.metadata.generation
local observed = status.observedGeneration
if generation ~= nil and (observed == nil or observed < generation) then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to act on generation " .. string.format("%d", generation)
  return hs
end

local validated = condition(status, "Validated")
if validated ~= nil and validated.status == "False" then
  hs.status = "Degraded"
  hs.message = message_of(status, "Validated", "The spec is invalid")
  return hs
end

local phase = status.phase
if phase == "Failed" then
  hs.status = "Degraded"
  hs.message = message_of(status, "Failed", "Training failed")
  return hs
end
if phase == "Succeeded" then
  local gates = condition(status, "GatesPassed")
  if gates ~= nil and gates.status == "False" then
    hs.status = "Degraded"
    hs.message = "Quality gates " .. (gates.message or "failed")
    return hs
  end
  local promoted = condition(status, "Promoted")
  if promoted ~= nil and promoted.status == "False" and promoted.reason == "PromotionFailed" then
    hs.status = "Degraded"
    hs.message = "Promotion failed: " .. (promoted.message or "see status.promotion")
    return hs
  end
  hs.status = "Healthy"
  hs.message = message_of(status, "Succeeded", "Training succeeded")
  return hs
end
if phase == "Suspended" or (obj.spec ~= nil and obj.spec.suspend == true) then
  hs.status = "Suspended"
  hs.message = message_of(status, "Suspended", "Suspended: set spec.suspend to false to resume")
  return hs
end

hs.status = "Progressing"
if phase == "Running" then
  hs.message = progress_text(status) or message_of(status, "Running", "Training")
else
  -- Pending: the Running=False condition says why (Unschedulable, ImagePullBackOff, ...).
  hs.message = message_of(status, "Running", "Waiting for the trainer to start")
end
return hs
