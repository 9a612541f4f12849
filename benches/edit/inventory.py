"""A small inventory service: items, stock levels, orders and reports."""

from dataclasses import dataclass, field
from datetime import datetime
from typing import Dict, List, Optional


class InventoryError(Exception):
    """Raised when an operation would leave the inventory inconsistent."""


@dataclass
class Item:
    sku: str
    name: str
    price: float
    quantity: int = 0
    tags: List[str] = field(default_factory=list)

    def total_value(self) -> float:
        return self.price * self.quantity

    def is_low(self, threshold: int) -> bool:
        return self.quantity < threshold


@dataclass
class OrderLine:
    sku: str
    quantity: int
    unit_price: float

    def subtotal(self) -> float:
        return self.quantity * self.unit_price


@dataclass
class Order:
    order_id: int
    customer: str
    lines: List[OrderLine] = field(default_factory=list)
    created: datetime = field(default_factory=datetime.now)
    shipped: bool = False

    def total(self) -> float:
        return sum(line.subtotal() for line in self.lines)


class Inventory:
    def __init__(self):
        self.items: Dict[str, Item] = {}
        self.orders: Dict[int, Order] = {}
        self.next_order_id = 1

    def add_item(self, sku: str, name: str, price: float, quantity: int = 0) -> Item:
        if sku in self.items:
            raise InventoryError(f"item {sku} already exists")
        if price < 0:
            raise InventoryError("price must not be negative")
        item = Item(sku, name, price, quantity)
        self.items[sku] = item
        return item

    def remove_item(self, sku: str) -> None:
        if sku not in self.items:
            raise InventoryError(f"no item {sku}")
        del self.items[sku]

    def restock(self, sku: str, amount: int) -> int:
        item = self.get_item(sku)
        if amount <= 0:
            raise InventoryError("restock amount must be positive")
        item.quantity += amount
        return item.quantity

    def get_item(self, sku: str) -> Item:
        item = self.items.get(sku)
        if item is None:
            raise InventoryError(f"no item {sku}")
        return item

    def find_by_tag(self, tag: str) -> List[Item]:
        return [item for item in self.items.values() if tag in item.tags]

    def place_order(self, customer: str, wanted: Dict[str, int]) -> Order:
        for sku, quantity in wanted.items():
            item = self.get_item(sku)
            if quantity <= 0:
                raise InventoryError("order quantities must be positive")
            if item.quantity < quantity:
                raise InventoryError(f"not enough {item.name} in stock")
        order = Order(self.next_order_id, customer)
        for sku, quantity in wanted.items():
            item = self.items[sku]
            item.quantity -= quantity
            order.lines.append(OrderLine(sku, quantity, item.price))
        self.orders[order.order_id] = order
        self.next_order_id += 1
        return order

    def cancel_order(self, order_id: int) -> None:
        order = self.orders.get(order_id)
        if order is None:
            raise InventoryError(f"no order {order_id}")
        if order.shipped:
            raise InventoryError("a shipped order cannot be cancelled")
        for line in order.lines:
            self.items[line.sku].quantity += line.quantity
        del self.orders[order_id]

    def ship_order(self, order_id: int) -> Order:
        order = self.orders.get(order_id)
        if order is None:
            raise InventoryError(f"no order {order_id}")
        order.shipped = True
        return order

    def total_value(self) -> float:
        return sum(item.total_value() for item in self.items.values())

    def low_stock(self, threshold: int = 5) -> List[Item]:
        return sorted(
            (item for item in self.items.values() if item.is_low(threshold)),
            key=lambda item: item.quantity,
        )

    def revenue(self, customer: Optional[str] = None) -> float:
        return sum(
            order.total()
            for order in self.orders.values()
            if order.shipped and (customer is None or order.customer == customer)
        )

    def report(self) -> str:
        lines = ["SKU        NAME                 QTY      VALUE"]
        for item in sorted(self.items.values(), key=lambda item: item.sku):
            lines.append(
                f"{item.sku:<10} {item.name:<20} {item.quantity:>5} {item.total_value():>10.2f}"
            )
        lines.append(f"total value: {self.total_value():.2f}")
        return "\n".join(lines)
