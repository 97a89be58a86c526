-- Referral and team-up campaigns (claim_service/domain/campaigns.py): the campaign as ops
-- set it, each member's code (a team's code for a team-up), who was attributed to whom,
-- refusals (anti-fraud), and the rewards granted (held for a cool-off, then released).
CREATE TABLE campaigns (
    campaign_id  text PRIMARY KEY,
    type         text NOT NULL CHECK (type IN ('referral', 'team')),
    definition   jsonb NOT NULL,
    version      integer NOT NULL DEFAULT 1,
    created_at   timestamptz NOT NULL DEFAULT now(),
    updated_at   timestamptz NOT NULL DEFAULT now()
);

-- A referral campaign gives each member one code; a team-up gives each team one (its opener
-- may open another once it expired).
CREATE TABLE referral_codes (
    code          text PRIMARY KEY,
    campaign_id   text NOT NULL REFERENCES campaigns,
    user_id       text NOT NULL,
    fingerprints  text[] NOT NULL DEFAULT '{}',
    expires_at    timestamptz,             -- a team's: it must be complete by then
    completed_at  timestamptz,             -- a team's: every member qualified
    created_at    timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX referral_codes_member ON referral_codes (campaign_id, user_id, created_at DESC);

-- An invitee counts once per campaign, for the code it was attributed to.
CREATE TABLE referral_attributions (
    campaign_id      text NOT NULL REFERENCES campaigns,
    invitee_id       text NOT NULL,
    referrer_id      text NOT NULL,
    code             text NOT NULL REFERENCES referral_codes,
    source           text NOT NULL CHECK (source IN ('event', 'late')),
    opened_event_id  text NOT NULL,
    opened_at        timestamptz NOT NULL,
    fingerprints     text[] NOT NULL DEFAULT '{}',
    state            text NOT NULL DEFAULT 'attributed'
                     CHECK (state IN ('attributed', 'qualified', 'revoked')),
    qualified_at     timestamptz,
    qualify_event_id text,
    hold_until       timestamptz,             -- revoked by an account_closed before then
    revoked_at       timestamptz,
    attributed_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (campaign_id, invitee_id)
);
CREATE INDEX referral_attributions_code ON referral_attributions (code);
CREATE INDEX referral_attributions_referrer
    ON referral_attributions (campaign_id, referrer_id, attributed_at);
CREATE INDEX referral_attributions_invitee ON referral_attributions (invitee_id);

-- Refused attributions: the funnel and the audit. One per event (a replay of the event gets
-- the same answer) or per reason of a late registration.
CREATE TABLE referral_refusals (
    campaign_id  text NOT NULL REFERENCES campaigns,
    invitee_id   text NOT NULL,
    attempt      text NOT NULL,               -- the event's id, or late:<reason>
    code         text NOT NULL,
    reason       text NOT NULL,
    refused_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (campaign_id, invitee_id, attempt)
);

-- One reward per (campaign, member, level, code): a referrer's at invitees_required and at
-- each tier's count, a team member's for that team. Counted against the budget unless
-- revoked or over_budget.
CREATE TABLE campaign_rewards (
    reward_id    bigserial PRIMARY KEY,
    campaign_id  text NOT NULL REFERENCES campaigns,
    user_id      text NOT NULL,
    level        integer NOT NULL,
    code         text NOT NULL,
    benefit_id   text,                        -- the benefit it unlocks, or
    points       integer,                     -- the points it credits
    state        text NOT NULL
                 CHECK (state IN ('held', 'released', 'revoked', 'over_budget')),
    hold_until   timestamptz NOT NULL,
    granted_at   timestamptz NOT NULL DEFAULT now(),
    released_at  timestamptz,
    revoked_at   timestamptz,
    UNIQUE (campaign_id, user_id, level, code)
);
CREATE INDEX campaign_rewards_due ON campaign_rewards (hold_until) WHERE state = 'held';
CREATE INDEX campaign_rewards_benefit ON campaign_rewards (benefit_id, user_id)
    WHERE benefit_id IS NOT NULL;
