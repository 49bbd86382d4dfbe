"""DICOM date/time attributes to Python datetimes (naive, scanner local time)."""

from __future__ import annotations

from datetime import datetime, timedelta

from pydicom import Dataset
from pydicom.valuerep import DA, DT, TM


def combine(date: str | None, time: str | None) -> datetime | None:
    """DA + TM strings to a datetime, None when either is empty."""
    if not date or not time:
        return None
    return datetime.combine(DA(str(date)), TM(str(time)))


def parse_dt(value: str | None) -> datetime | None:
    """A DT string to a naive datetime (any UTC offset dropped), None when empty."""
    if not value:
        return None
    return DT(str(value)).replace(tzinfo=None)


def acquisition_start(ds: Dataset) -> datetime | None:
    """Start of the acquisition: AcquisitionDateTime, else AcquisitionDate + AcquisitionTime."""
    return parse_dt(ds.get("AcquisitionDateTime")) or combine(ds.get("AcquisitionDate"), ds.get("AcquisitionTime"))


def injection_time(ds: Dataset, item: Dataset) -> datetime | None:
    """Radiopharmaceutical start: its DT, else its TM on the acquisition date (the day before
    when that would put it after the acquisition start: an injection across midnight)."""
    start = parse_dt(item.get("RadiopharmaceuticalStartDateTime"))
    if start is not None:
        return start
    acquired = acquisition_start(ds)
    time = item.get("RadiopharmaceuticalStartTime")
    if acquired is None or not time:
        return None
    candidate = datetime.combine(acquired.date(), TM(str(time)))
    return candidate - timedelta(days=1) if candidate > acquired else candidate
