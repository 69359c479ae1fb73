"""Which credential the Azure provider and ``cloudmap pools`` use when given none.

A shared key from ``AZURE_BATCH_ACCOUNT`` and ``AZURE_BATCH_ACCESS_KEY`` (the variables
Batch's own tools read) when both are set; otherwise ``DefaultAzureCredential``: az login,
a managed identity, environment variables of a service principal, ... The key is never
logged or shown: the credential objects hide it.
"""

from __future__ import annotations

import os
from typing import Any

ACCOUNT_VARIABLE = "AZURE_BATCH_ACCOUNT"
KEY_VARIABLE = "AZURE_BATCH_ACCESS_KEY"


def default_credential() -> Any:
    account, key = os.environ.get(ACCOUNT_VARIABLE), os.environ.get(KEY_VARIABLE)
    if account and key:
        from azure.core.credentials import AzureNamedKeyCredential

        return AzureNamedKeyCredential(account, key)
    from azure.identity import DefaultAzureCredential

    return DefaultAzureCredential()
