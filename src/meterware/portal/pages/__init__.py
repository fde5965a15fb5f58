"""The portal's pages, one module per part of the navigation; each page is a function
``(ctx, request, **arguments) -> PortalResponse`` (see :mod:`meterware.portal.views`)."""
