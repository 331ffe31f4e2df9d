#!/usr/bin/env bash
# Mutation testing of the money paths with mutmut (issue 15.4). Not part of scripts/test.sh or CI.
#
#   scripts/mutate.sh                  every mutant of the money functions below, then the totals
#   scripts/mutate.sh 'shop.xǁShopǁsettle__mutmut_*'    run only these mutants (mutmut's names, globs
#                                      allowed): to check new tests. mutmut 3.8.1 then forgets the other
#                                      verdicts (seen 2026-12-01), so the totals come from a full run
#   scripts/mutation_report.py         the totals and survivors of everything run so far, again
#   MUTATE_JOBS=1 scripts/mutate.sh    fewer worker processes (default 2: the machine is shared)
#
# Mutates shop.py, provisioning.py, models.py, jobs.py and stars.py in a copy (mutants/, thrown away at each
# full run; mutmut re-makes a changed function's mutants) and runs, per mutant, only the tests of setup.cfg
# [mutmut] that reach its function, on SQLite. A survivor is a change to a money rule that no test notices:
# add a test that kills it, or, if it cannot change behaviour, list it with the reason in
# scripts/mutants-equivalent.txt. Exits non-zero when a survivor is not listed there.
set -euo pipefail

cd "$(dirname "$0")/.."

# The money paths: settlement, invoice checks, promo redemption, gifts, referrals, the day grant,
# the payment poller and the per-panel provisioning retry (with the link delivery they drive), and the
# Stars settlement (the update, the getStarTransactions recovery job, the refund's take-back).
MONEY=(
    'shop.xǁShopǁregister__mutmut_*'
    'shop.xǁShopǁcheck_payment__mutmut_*'
    'shop.xǁShopǁapply_invoice_state__mutmut_*'
    'shop.xǁShopǁsettle__mutmut_*'
    'shop.xǁShopǁreward_referral__mutmut_*'
    'shop.xǁShopǁexpire_payment__mutmut_*'
    'provisioning.xǁProvisioningǁprovision__mutmut_*'
    'provisioning.xǁProvisioningǁprovision_on__mutmut_*'
    'provisioning.xǁProvisioningǁ_push__mutmut_*'
    'provisioning.xǁProvisioningǁrecord_failure__mutmut_*'
    'shop.xǁShopǁclaim_notification__mutmut_*'
    'shop.xǁShopǁmark_notified__mutmut_*'
    'shop.xǁShopǁrelease_notification__mutmut_*'
    'shop.xǁShopǁclaim_gift__mutmut_*'
    'shop.xǁShopǁredeem_promo__mutmut_*'
    'shop.xǁShopǁ_redeem__mutmut_*'
    'models.x_grant_days__mutmut_*'
    'models.x_mark_dirty__mutmut_*'
    'models.x_locked_expiry__mutmut_*'
    'jobs.x_poll_payments__mutmut_*'
    'jobs.x_judge_batch__mutmut_*'
    'jobs.x_settle_paid__mutmut_*'
    'jobs.x_deliver_link__mutmut_*'
    'jobs.x_retry_provisioning__mutmut_*'
    'jobs.x_retry_panel__mutmut_*'
    'stars.xǁStarsǁsettle__mutmut_*'
    'stars.xǁStarsǁdeliver__mutmut_*'
    'stars.xǁStarsǁsync_transactions__mutmut_*'
    'stars.xǁStarsǁ_apply__mutmut_*'
    'stars.xǁStarsǁrecord_refund__mutmut_*'
)

if [[ ! -x .venv/bin/python ]]; then
    python=$(command -v python3.11 || command -v python3) || { echo "mutate.sh: python3.11 is required" >&2; exit 1; }
    "$python" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check --require-hashes -r requirements-dev.lock
# mutmut (pinned) and what it pulls in; kept out of the hash-locked files: it never runs in the service or CI
.venv/bin/python -m pip install --quiet --disable-pip-version-check -r requirements-mutation.txt

# A full run starts from nothing; a run of named mutants (survivors, after new tests) re-uses mutants/, and
# mutmut itself re-makes the mutants of any function whose code changed since.
if [[ $# -eq 0 ]]; then rm -rf mutants; fi
mkdir -p mutants
# every other module the tests import, also ones added after setup.cfg's also_copy was written
for module in *.py; do
    case $module in shop.py | provisioning.py | models.py | jobs.py | stars.py) ;; *) cp -p "$module" mutants/ ;; esac
done

if [[ $# -gt 0 ]]; then selected=("$@"); else selected=("${MONEY[@]}"); fi
started=$(date +%s)
# mutmut redraws a progress line many times a second: keep its output in a log, show the end
if ! env -u TEST_DATABASE_URL nice .venv/bin/mutmut run --max-children "${MUTATE_JOBS:-2}" "${selected[@]}" \
        >mutants/run.log 2>&1; then
    tr '\r' '\n' <mutants/run.log | tail -n 40 >&2
    echo "mutate.sh: mutmut failed (the whole log: mutants/run.log)" >&2
    exit 1
fi
elapsed=$(($(date +%s) - started))

exec .venv/bin/python scripts/mutation_report.py --seconds "$elapsed" "${selected[@]}"
