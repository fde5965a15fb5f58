"""Billing: customers and keys, prices, the credit ledger, invoices, corrections, alerts, self-service and
exports to payment providers. Nothing here runs on the request path."""
