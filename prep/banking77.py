"""banking77 (PolyAI/banking77): a customer-service message -> one of 77 intent names.

Published as train.csv / test.csv with columns text, category (the intent name); the hub version has integer
labels, which `load_hub_rows` maps to the same names. The official test split is the held-out set. The prompt
lists every intent, so the base model can answer too and the retention report measures real forgetting.

Intents are verbalised (``card_arrival`` -> ``card arrival``) in the prompt's list and in the response: a model
learns words it already knows, not snake_case. Measured on stories260k, whose 512-piece vocabulary has no trained
piece for ``_`` (byte fallback): with underscores it scored 0 % after fine-tuning, with spaces it learns. The
scorer (``eval.classification.label_key``) reads either spelling as the same intent.

A response ends with a newline: the answer is one line, and eval scores the first line, so an answer that runs on
past its end still scores. stories260k's answers did run on until the patch ``train_eos_row_when_frozen_dead``: Ludwig
trains the EOS after every response, but stories260k's ``</s>`` output row was never a pretraining target and LoRA
leaves it frozen, so no hidden state could make EOS likelier than 0.005 (ludwig_mt/patches/fixes.py, item 11). With
the patch, 40 of 40 test answers stop by themselves right after the line end (0 of 40 without; 750 training rows).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from prep.common import (
    TEST,
    TRAIN,
    PrepError,
    SourceRow,
    normalise_key,
    read_file_or_folder,
    read_split_files,
    require_text,
)
from prep.task import RESPONSE, TaskSpec

# The 77 intent names, in the hub's label order (alphabetical, case-insensitive). Eval uses this list to count
# answers that are not a valid intent.
INTENTS: tuple[str, ...] = (
    'activate_my_card', 'age_limit', 'apple_pay_or_google_pay', 'atm_support', 'automatic_top_up',
    'balance_not_updated_after_bank_transfer', 'balance_not_updated_after_cheque_or_cash_deposit',
    'beneficiary_not_allowed', 'cancel_transfer', 'card_about_to_expire', 'card_acceptance', 'card_arrival',
    'card_delivery_estimate', 'card_linking', 'card_not_working', 'card_payment_fee_charged',
    'card_payment_not_recognised', 'card_payment_wrong_exchange_rate', 'card_swallowed', 'cash_withdrawal_charge',
    'cash_withdrawal_not_recognised', 'change_pin', 'compromised_card', 'contactless_not_working',
    'country_support', 'declined_card_payment', 'declined_cash_withdrawal', 'declined_transfer',
    'direct_debit_payment_not_recognised', 'disposable_card_limits', 'edit_personal_details', 'exchange_charge',
    'exchange_rate', 'exchange_via_app', 'extra_charge_on_statement', 'failed_transfer', 'fiat_currency_support',
    'get_disposable_virtual_card', 'get_physical_card', 'getting_spare_card', 'getting_virtual_card',
    'lost_or_stolen_card', 'lost_or_stolen_phone', 'order_physical_card', 'passcode_forgotten',
    'pending_card_payment', 'pending_cash_withdrawal', 'pending_top_up', 'pending_transfer', 'pin_blocked',
    'receiving_money', 'Refund_not_showing_up', 'request_refund', 'reverted_card_payment?',
    'supported_cards_and_currencies', 'terminate_account', 'top_up_by_bank_transfer_charge',
    'top_up_by_card_charge', 'top_up_by_cash_or_cheque', 'top_up_failed', 'top_up_limits', 'top_up_reverted',
    'topping_up_by_card', 'transaction_charged_twice', 'transfer_fee_charged', 'transfer_into_account',
    'transfer_not_received_by_recipient', 'transfer_timing', 'unable_to_verify_identity', 'verify_my_identity',
    'verify_source_of_funds', 'verify_top_up', 'virtual_card_not_working', 'visa_or_mastercard',
    'why_verify_identity', 'wrong_amount_of_cash_received', 'wrong_exchange_rate_for_cash_withdrawal',
)



def verbalise(intent: str) -> str:
    """An intent name as words: ``card_arrival`` -> ``card arrival`` (``Refund_not_showing_up`` keeps its case)."""
    return intent.replace("_", " ")


TEMPLATE = (
    "### Task: Classify the banking customer message into exactly one of these intents:\n"
    + ", ".join(map(verbalise, INTENTS))
    + "\n### Message:\n{text}\n### Intent:\n"
)


def read_local(path: Path) -> list[SourceRow]:
    if path.is_dir():
        return read_split_files(path, {"train": "train.csv", "test": "test.csv"})
    return read_file_or_folder(path)


def to_fields(row: SourceRow) -> dict[str, str]:
    key = "category" if "category" in row.data else "label"
    intent = require_text(row, key)
    if intent not in INTENTS:
        raise PrepError(row.where, f"unknown intent '{intent}'", "use one of the 77 banking77 intent names")
    return {"text": require_text(row, "text"), RESPONSE: verbalise(intent) + "\n"}


def group_key(fields: Mapping[str, str]) -> str:
    return normalise_key(fields["text"])


TASK = TaskSpec(
    name="banking77",
    hub_name="PolyAI/banking77",
    template=TEMPLATE,
    read_local=read_local,
    to_fields=to_fields,
    group_key=group_key,
    keep_columns=("text",),
    official_splits={"train": TRAIN, "test": TEST},
    source_folder="banking77",
    ludwig_config="banking77.yaml",
    scorer="intents",
    primary_metric="accuracy",
)
