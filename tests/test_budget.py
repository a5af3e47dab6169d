import pytest

from services.budget import ByteBudget


def test_takes_what_fits_and_refuses_what_does_not():
    budget = ByteBudget(100)
    assert budget.try_take(60)
    assert not budget.try_take(41)
    assert budget.try_take(40)
    assert budget.used == 100
    budget.give_back(60)
    assert budget.try_take(50) and budget.used == 90


def test_a_zero_budget_takes_nothing():
    budget = ByteBudget(0)
    assert not budget.try_take(1)
    assert budget.used == 0


def test_bytes_already_held_are_counted_even_over_the_cap():
    budget = ByteBudget(10)
    budget.take(25)
    assert budget.used == 25
    assert not budget.try_take(1)
    budget.give_back(25)
    assert budget.try_take(10)


def test_giving_back_more_than_was_taken_is_a_bug():
    budget = ByteBudget(10)
    budget.take(5)
    with pytest.raises(AssertionError):
        budget.give_back(6)
